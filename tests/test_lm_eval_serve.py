"""lm-evaluation-harness, a client no one here wrote, against `drex serve --policy full` on SmolLM2: the
small version of `benchmarks/lm_eval_serve.py`. On the first documents of both local-file tasks, the
served model scores what lm_eval's own HF backend scores on the same weights: the same generated text
per document (through /v1/completions and /v1/chat/completions), the same choices and loglikelihoods
within float32 noise. Only 127.0.0.1 is contacted; HF_HUB_OFFLINE is set (conftest)."""

from __future__ import annotations

import importlib.util
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "lm_eval_serve.py"
HEADS = ROOT / "model_cards" / "smollm2-135m-drex"
MC_DOCS, GEN_DOCS = 4, 3
SECONDS = 120
# Per choice, |served - HF| of a summed loglikelihood: both float32 forwards of the same ~70 tokens, in
# different kernels (the engine's prefill vs HF's forward); a real difference (a shifted token, another
# model) is of order 1 or more.
LOGLIKELIHOOD_TOL = 1e-3

pytestmark = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm_eval is not installed")


def _script():
    spec = importlib.util.spec_from_file_location("lm_eval_serve", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["lm_eval_serve"] = module
    spec.loader.exec_module(module)
    return module


def test_script_help_shows_its_defaults():
    done = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "full,drex,self_spec" in done.stdout and "(default: 60)" in done.stdout


@pytest.fixture(scope="module")
def runs(smollm2_home):
    """lm_eval's HF backend, then `drex serve --policy full` (in this process, on a free local port)
    through local-completions and local-chat-completions, on the first documents of both tasks."""
    import numpy as np
    from serve_support import serving

    rng_state = random.getstate(), np.random.get_state(), torch.random.get_rng_state()  # lm_eval reseeds them
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the script: on a shared 2-core machine two threads ran HF's forward 4-8x slower
    lme = _script()
    start = time.perf_counter()
    folder = lme.base_folder(HEADS)
    assert folder.is_relative_to(smollm2_home[0])  # the session's converted GGUF, nothing from a hub
    hf = lme.hf_model(folder, batch_size=1)
    out = {"hf": {lme.MC_TASK: lme.evaluate(hf, lme.MC_TASK, MC_DOCS, chat=False),
                  lme.GEN_TASK: lme.evaluate(hf, lme.GEN_TASK, GEN_DOCS, chat=True)}}  # fmt: skip
    del hf
    args = lme.parse_args(["--num-concurrent", "4", "--max-len", "512"])
    with serving(HEADS, policy="full", max_len=512) as served:
        out["url"] = served.url
        for client in ("local-completions", "local-chat-completions"):
            lm = lme.api_model(client, served.url, served.name, folder, args)
            out[client] = {lme.GEN_TASK: lme.evaluate(lm, lme.GEN_TASK, GEN_DOCS, chat=True)}
        lm = lme.api_model("local-completions", served.url, served.name, folder, args)
        try:
            out["local-completions"][lme.MC_TASK] = lme.evaluate(lm, lme.MC_TASK, MC_DOCS, chat=False)
        except Exception as err:  # noqa: BLE001 - a server without echo/logprobs answers 400
            out["local-completions"][lme.MC_TASK] = err
    out["seconds"] = time.perf_counter() - start
    torch.set_num_threads(threads)
    random.setstate(rng_state[0])
    np.random.set_state(rng_state[1])
    torch.random.set_rng_state(rng_state[2])
    return lme, out


@pytest.mark.slow
def test_served_generations_equal_lm_evals_hf_backend(runs):
    lme, out = runs
    assert out["url"].startswith("http://127.0.0.1:")
    hf_metrics, hf_samples, _ = out["hf"][lme.GEN_TASK]
    assert any(s["text"] for s in hf_samples)  # the model did write something
    for client in ("local-completions", "local-chat-completions"):
        metrics, samples, _ = out[client][lme.GEN_TASK]
        assert [s["text"] for s in samples] == [s["text"] for s in hf_samples], client
        assert metrics == hf_metrics, client
    # about 50 s on the shared 2-core CPU; the bound catches a hang or a pathological slowdown, not noise
    assert out["seconds"] < SECONDS, f"the small lm_eval runs took {out['seconds']:.0f} s"


@pytest.mark.slow
def test_served_loglikelihoods_equal_lm_evals_hf_backend(runs):
    lme, out = runs
    mc = out["local-completions"][lme.MC_TASK]
    if isinstance(mc, Exception):
        if "400" in str(mc):
            pytest.skip(f"this server refuses what lm_eval sends for loglikelihoods (echo + logprobs): {mc}")
        raise mc
    hf_metrics, hf_samples, _ = out["hf"][lme.MC_TASK]
    metrics, samples, _ = mc
    assert metrics == hf_metrics  # acc and acc_norm exactly (and so their stderr)
    compared = lme.compare(hf_samples, samples)
    assert compared["same_choice"] == MC_DOCS
    assert compared["max_abs_loglikelihood_diff"] <= LOGLIKELIHOOD_TOL, compared
