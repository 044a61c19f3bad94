"""Helpers shared by the `drex serve` tests: a tiny exit-heads folder with a chat template, a server
on a free local port for a test module, offline references from generate()."""

from __future__ import annotations

import contextlib

import torch
from conftest import make_tiny, tiny_tokenizer

from drex_hf import EarlyExitConfig
from drex_hf.modeling import EarlyExitModelForCausalLM

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
THRESHOLDS = [0.12, 0.2]  # tokens leave at both exits and at full depth on the tiny model


def make_heads_dir(root):
    """A tiny Llama + word-level tokenizer (with a chat template) and untrained heads after layers 1, 2."""
    base = root / "tiny-llama"
    make_tiny("llama").save_pretrained(base)
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    tokenizer.save_pretrained(base)
    config = EarlyExitConfig(exit_layers=[1, 2], confidence="max_prob", thresholds=THRESHOLDS)
    EarlyExitModelForCausalLM.from_base(str(base), config).save_pretrained(root / "heads")
    return root / "heads"


@contextlib.contextmanager
def serving(heads_dir, **options):
    from drex_hf.cli.serve import load
    from drex_hf.serve.server import ServeOptions, run_server

    model, tokenizer, name = load(str(heads_dir))
    with run_server(model, tokenizer, model_name=name, options=ServeOptions(**options)) as served:
        served.model, served.tokenizer, served.name = model, tokenizer, name
        yield served


def reference(model, ids, max_tokens, **sampling):
    """(tokens, exit layers) generate() gives the prompt alone."""
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_tokens, return_dict_in_generate=True, **sampling)
    n = int((out.exit_layers[0] >= 0).sum())
    return out.sequences[0, len(ids) : len(ids) + n].tolist(), out.exit_layers[0, :n].tolist()


def metric_values(text):
    """{(sample name, sorted labels): value} from Prometheus text, parsed with prometheus_client's parser."""
    from prometheus_client.parser import text_string_to_metric_families

    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
