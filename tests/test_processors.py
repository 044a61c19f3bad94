"""HF's logits processors and stop strings in generate(), the engine and `drex generate`: each one does
what HF's does (and equals HF's own generate at full depth), the engine equals the reference decoder
with them on, and a row's processors see only its own tokens (invariant 1 with processors)."""

import dataclasses
import math
import re
import string
import sys

import pytest
import torch
from conftest import assert_every_exit_taken, covering_thresholds, make_tiny, padded_batch

from drex_hf import EarlyExitConfig, EarlyExitModelForCausalLM
from drex_hf.errors import GenerationInputError
from drex_hf.generation.engine import DrexEngine
from drex_hf.generation.reference import generate_reference
from drex_hf.generation.scheduler import CostModel, RandomPolicy
from drex_hf.generation.settings import DecodeSettings

LENGTHS = [5, 9, 3, 12, 1, 7, 4, 10]
NEW = 16
SAMPLING = dict(do_sample=True, temperature=2.0, top_k=50, top_p=0.95)
EOS = 43  # some rows of the tiny Llama take it first or second: min_new_tokens has something to hold back
# every processor at once; bad words: one the tiny model emits often, and a two-token sequence
PROCESSORS = dict(
    repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=((44,), (34, 32)), min_new_tokens=5,
    eos_token_ids=(EOS,),
)  # fmt: skip


def _model(kind="llama", confidence="max_prob", thresholds=math.inf):
    config = EarlyExitConfig(exit_layers=[0, 1, 2], thresholds=thresholds, confidence=confidence, head="norm")
    model = EarlyExitModelForCausalLM.from_base(make_tiny(kind), config)
    if confidence == "classifier":  # an untrained classifier says 0.5 everywhere; give it an opinion
        torch.manual_seed(1)
        for head in model.heads:
            torch.nn.init.normal_(head.classifier.fc2.weight, std=2.0)
    return model


def _batch(lengths=LENGTHS):
    ids, mask = padded_batch(lengths)
    return ids, mask, [ids[b, mask[b].bool()] for b in range(len(lengths))]


def _rows(out, width):
    """Each row's new tokens (up to its padding: exit layer -1) as lists."""
    return [
        out.sequences[b, width : width + int((out.exit_layers[b] >= 0).sum())].tolist()
        for b in range(out.sequences.shape[0])
    ]


def _drex(model, ids, mask, prompts, **kwargs):
    """generate() under drex with thresholds that send tokens out at every exit point (found by the
    reference decoder with the same options), returning (output, new tokens per row)."""
    settings = DecodeSettings(max_new_tokens=NEW, **_settings_kwargs(kwargs))
    thresholds, _ = covering_thresholds(model, prompts, [(settings, None)])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, thresholds=thresholds, cost_model=CostModel.constant(4),
        return_dict_in_generate=True, **kwargs,
    )  # fmt: skip
    assert_every_exit_taken(out.exit_layers, model, thresholds)
    return out, _rows(out, ids.shape[1])


def _settings_kwargs(generate_kwargs):
    out = dict(generate_kwargs)
    eos = out.pop("eos_token_id", None)
    out["eos_token_ids"] = () if eos is None else (eos,)
    if "bad_words_ids" in out:
        out["bad_words_ids"] = tuple(tuple(w) for w in out["bad_words_ids"])
    return out


def _ngrams(row, n):
    return [tuple(row[i : i + n]) for i in range(len(row) - n + 1)]


# ---------------------------------------------------------------- each processor does its job
def test_repetition_penalty_lowers_repeats():
    model = _model()
    ids, mask, prompts = _batch()
    _, plain = _drex(model, ids, mask, prompts, eos_token_id=None)
    _, penalised = _drex(model, ids, mask, prompts, eos_token_id=None, repetition_penalty=3.0)

    def repeats(rows):  # new tokens that were already in the row's prompt or output
        count = 0
        for prompt, row in zip(prompts, rows):
            seen = prompt.tolist()
            for token in row:
                count += token in seen
                seen.append(token)
        return count

    assert repeats(penalised) < repeats(plain) / 2, (repeats(penalised), repeats(plain))


def test_no_repeat_ngram_size_leaves_no_ngram_twice_in_any_row():
    model = _model()
    ids, mask, prompts = _batch()
    _, plain = _drex(model, ids, mask, prompts, eos_token_id=None)
    _, banned = _drex(model, ids, mask, prompts, eos_token_id=None, no_repeat_ngram_size=2)
    twice = [len(set(g)) < len(g) for p, row in zip(prompts, plain) for g in [_ngrams(p.tolist() + row, 2)]]
    assert any(twice)  # without it the tiny model repeats itself
    for p, row in zip(prompts, banned):
        grams = _ngrams(p.tolist() + row, 2)
        assert len(set(grams)) == len(grams), row
        assert len(row) == NEW


def test_bad_words_never_appear():
    model = _model()
    ids, mask, prompts = _batch()
    _, plain = _drex(model, ids, mask, prompts, eos_token_id=None)
    single, (a, b) = 44, (34, 32)
    assert any(single in row for row in plain)
    assert any((a, b) in _ngrams([p.tolist()[-1], *row], 2) for p, row in zip(prompts, plain))
    _, clean = _drex(model, ids, mask, prompts, eos_token_id=None, bad_words_ids=[[single], [a, b]])
    for p, row in zip(prompts, clean):
        assert single not in row
        assert (a, b) not in _ngrams([p.tolist()[-1], *row], 2)  # never completed, not even after the prompt


def test_min_new_tokens_holds_back_eos_per_row():
    model = _model()
    ids, mask, prompts = _batch()
    _, free = _drex(model, ids, mask, prompts, eos_token_id=EOS)
    early = [len(row) for row in free if len(row) < 6]
    assert early and any(n <= 2 for n in early)  # rows that end on eos right away without it
    _, held = _drex(model, ids, mask, prompts, eos_token_id=EOS, min_new_tokens=6)
    for row in held:
        assert EOS not in row[:6] and len(row) >= 6


@pytest.mark.parametrize(
    "options",
    [
        dict(repetition_penalty=1.5),
        dict(no_repeat_ngram_size=2),
        dict(bad_words_ids=[[44], [34, 32]]),
        dict(min_new_tokens=6, eos_token_id=EOS),
        dict(repetition_penalty=1.3, no_repeat_ngram_size=3, bad_words_ids=[[44]], min_new_tokens=5, eos_token_id=EOS),
    ],
)
def test_full_depth_with_processors_equals_hf_generate(options):
    """At full depth (policy full, or no exit passing) the options give exactly HF's own greedy tokens."""
    model = _model()
    _, _, prompts = _batch()
    options = {"eos_token_id": None, **options}
    for prompt in prompts:
        hf = model.base_model.generate(prompt[None], max_new_tokens=NEW, do_sample=False, **options)
        for policy in ("full", "drex"):
            ours = model.generate(prompt[None], max_new_tokens=NEW, policy=policy, **options)
            assert torch.equal(ours, hf), (policy, options)


# ---------------------------------------------------------------- stop strings
def char_tokenizer():
    """A tokenizer over the tiny vocab whose tokens are single characters a-z, A-Z, 0-9 and two-letter
    tokens xa..zh, decoded by concatenation: stop strings can end inside a token or span several."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    chars = list(string.ascii_lowercase + string.ascii_uppercase + string.digits)
    pairs = [a + b for a in "xyz" for b in string.ascii_lowercase][:34]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, **{t: i + 3 for i, t in enumerate(chars + pairs)}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<pad>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", bos_token="<s>", eos_token="</s>", padding_side="left"
    )


def _first_stop(tokenizer, prompt, row, stop):
    """How many of `row`'s tokens HF keeps: up to the first whose text completes `stop`."""
    for i in range(len(row)):
        if stop in tokenizer.decode(prompt + row[: i + 1]):
            return i + 1
    return len(row)


def test_stop_strings_end_each_row_after_the_token_that_completes_them():
    tokenizer = char_tokenizer()
    model = _model()
    ids, mask, prompts = _batch()
    _, plain = _drex(model, ids, mask, prompts, eos_token_id=None)
    # row 0's tokens 3 and 4 without the first character: the string ends inside a token's text
    stop = tokenizer.decode(plain[0][3:5])[1:]
    settings = DecodeSettings(max_new_tokens=NEW, stop_strings=(stop,))
    thresholds, _ = covering_thresholds(model, prompts, [(DecodeSettings(max_new_tokens=NEW), None)])
    out = model.generate(
        ids, attention_mask=mask, max_new_tokens=NEW, thresholds=thresholds, eos_token_id=None, pad_token_id=0,
        stop_strings=stop, tokenizer=tokenizer, return_dict_in_generate=True,
    )  # fmt: skip
    rows = _rows(out, ids.shape[1])
    kept = [_first_stop(tokenizer, p.tolist(), row, stop) for p, row in zip(prompts, plain)]
    assert kept[0] <= 5 < NEW
    for b, (row, n) in enumerate(zip(plain, kept)):
        assert rows[b] == row[:n], b  # the stopping token is kept, nothing after it, nothing trimmed
        assert out.sequences[b, ids.shape[1] + n :].eq(0).all() and out.exit_layers[b, n:].eq(-1).all()
    reference = generate_reference(model, prompts, settings, thresholds, tokenizer=tokenizer)
    assert [r.tokens for r in reference] == rows
    for prompt in prompts[:3]:  # at full depth: HF's own generate with the same stop string
        hf = model.base_model.generate(
            prompt[None], max_new_tokens=NEW, do_sample=False, eos_token_id=None, stop_strings=stop,
            tokenizer=tokenizer,
        )  # fmt: skip
        assert torch.equal(
            model.generate(prompt[None], max_new_tokens=NEW, policy="full", eos_token_id=None, stop_strings=stop,
                           tokenizer=tokenizer), hf,
        )  # fmt: skip


def test_stop_strings_need_a_tokenizer_that_can_match_them():
    from conftest import tiny_tokenizer

    model = _model()
    ids, mask, _ = _batch([4])
    with pytest.raises(GenerationInputError, match=r"stop_strings=\['ab'\] needs the model's tokenizer.*tokenizer="):
        model.generate(ids, max_new_tokens=4, stop_strings="ab")
    with pytest.raises(GenerationInputError, match="tokenizer must be a transformers tokenizer"):
        model.generate(ids, max_new_tokens=4, stop_strings="ab", tokenizer="gpt2")
    # a word-level vocabulary that cannot spell HF's probe text: refused up front, not mid-generation
    with pytest.raises(GenerationInputError, match="stop_strings cannot be matched with this tokenizer"):
        model.generate(ids, max_new_tokens=4, stop_strings="w5", tokenizer=tiny_tokenizer())


# ---------------------------------------------------------------- the engine equals the reference decoder
def _engine_run(model, prompts, settings, thresholds, seeds=None, policy="drex", tokenizer=None, **kw):
    engine = DrexEngine(
        model, max_batch=len(prompts), max_len=max(p.shape[0] for p in prompts) + settings.max_new_tokens,
        policy=policy, settings=settings, thresholds=thresholds, tokenizer=tokenizer, **kw,
    )  # fmt: skip
    with torch.no_grad():
        ids = [engine.add_request(p, seed=None if seeds is None else seeds[i]) for i, p in enumerate(prompts)]
        results = engine.run()
    return [results[i] for i in ids]


def _same(results, reference):
    for i, (got, want) in enumerate(zip(results, reference)):
        assert (got.tokens, got.exit_layers) == (want.tokens, want.exit_layers), f"request {i}"


def _run(kind):
    """(settings with every processor, seeds) of a greedy or a seeded sampling run."""
    if kind == "greedy":
        return DecodeSettings(max_new_tokens=NEW, **PROCESSORS), None
    return DecodeSettings(max_new_tokens=NEW, **PROCESSORS, **SAMPLING), [100 + i for i in range(len(LENGTHS))]


@pytest.mark.parametrize("confidence", ["max_prob", "classifier"])  # tokens picked at the check / projected later
@pytest.mark.parametrize("run", ["greedy", "sampled"])
def test_engine_with_processors_equals_the_reference_decoder_under_drex(run, confidence):
    settings, seeds = _run(run)
    model = _model(confidence=confidence)
    _, _, prompts = _batch()
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, seeds)])
    off = dataclasses.replace(settings, repetition_penalty=1.0, no_repeat_ngram_size=0, bad_words_ids=())
    off = dataclasses.replace(off, min_new_tokens=0)
    without = generate_reference(model, prompts, off, thresholds, seeds)
    assert [r.tokens for r in without] != [r.tokens for r in reference]  # the processors change tokens
    for policy in ("drex", RandomPolicy(num_segments=4, seed=3)):  # random decisions: riders read histories too
        results = _engine_run(model, prompts, settings, thresholds, seeds, policy, cost_model=CostModel.constant(4))
        _same(results, reference)
        assert_every_exit_taken([r.exit_layers for r in results], model, thresholds)
    results = _engine_run(model, prompts, settings, thresholds, seeds, defer_projection=False)
    _same(results, reference)


@pytest.mark.parametrize("run", ["greedy", "sampled"])
def test_engine_with_processors_equals_the_reference_decoder_under_full_and_batch_all(run):
    settings, seeds = _run(run)
    model = _model()
    _, _, prompts = _batch()
    full = generate_reference(model, prompts, settings, [math.inf] * 3, seeds)
    _same(_engine_run(model, prompts, settings, [0.5] * 3, seeds, policy="full"), full)
    thresholds, (reference,) = covering_thresholds(model, prompts, [(settings, seeds)])
    for b, prompt in enumerate(prompts):  # batch_all decides per row when the row is alone
        one = None if seeds is None else [seeds[b]]
        _same(_engine_run(model, [prompt], settings, thresholds, one, policy="batch_all"), [reference[b]])
    batched = _engine_run(model, prompts, settings, thresholds, seeds, policy="batch_all")
    assert [r.exit_layers for r in batched] != [r.exit_layers for r in reference]  # the batch decided
    for prompt, result in zip(prompts, batched):  # and each row's processors still held
        row = prompt.tolist() + result.tokens
        assert len(set(_ngrams(row, 3))) == len(_ngrams(row, 3))
        assert 44 not in result.tokens and EOS not in result.tokens[:5]
        assert (34, 32) not in _ngrams([prompt.tolist()[-1], *result.tokens], 2)


def test_engine_with_stop_strings_equals_the_reference_decoder():
    tokenizer = char_tokenizer()
    model = _model(confidence="classifier")
    _, _, prompts = _batch()
    seeds = [7 + i for i in range(len(prompts))]
    settings = DecodeSettings(max_new_tokens=NEW, **SAMPLING, **PROCESSORS)
    thresholds, (plain,) = covering_thresholds(model, prompts, [(settings, seeds)])
    long = [r.tokens for r in plain if len(r.tokens) >= 8]
    stops = (tokenizer.decode(long[0][4:6]), tokenizer.decode(long[1][6:7]))  # two tokens; one token
    settings = dataclasses.replace(settings, stop_strings=stops)
    reference = generate_reference(model, prompts, settings, thresholds, seeds, tokenizer=tokenizer)
    stopped = [len(r.tokens) < len(p.tokens) for r, p in zip(reference, plain)]
    assert sum(stopped) >= 2
    for r, p in zip(reference, plain):
        assert r.tokens == p.tokens[: len(r.tokens)]  # a stop string only ends rows
    _same(_engine_run(model, prompts, settings, thresholds, seeds, tokenizer=tokenizer), reference)


# ---------------------------------------------------------------- invariant 1 with processors
@pytest.mark.parametrize("sample", [False, True], ids=["greedy", "sampled"])
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_processors_are_batch_independent(kind, sample):
    """A row's tokens and exit layers are the same alone and in a batch: its processors see its own
    prompt and tokens only (HF's batched generate would see the left padding and the batch's width)."""
    model = _model(kind)
    ids, mask, prompts = _batch()
    extra = SAMPLING if sample else {}
    seeds = [11 * (i + 1) for i in range(len(prompts))] if sample else None
    settings = DecodeSettings(max_new_tokens=NEW, **PROCESSORS, **extra)
    model.exit_config.thresholds, _ = covering_thresholds(model, prompts, [(settings, seeds)])
    kwargs = dict(
        max_new_tokens=NEW, eos_token_id=EOS, repetition_penalty=1.3, no_repeat_ngram_size=3,
        bad_words_ids=[[44], [34, 32]], min_new_tokens=5, return_dict_in_generate=True, **extra,
    )  # fmt: skip
    batch = model.generate(ids, attention_mask=mask, seed=seeds, **kwargs)
    for b, n in enumerate(LENGTHS):
        alone = model.generate(ids[b : b + 1, -n:], seed=None if seeds is None else [seeds[b]], **kwargs)
        width = alone.sequences.shape[1]
        assert torch.equal(batch.sequences[b, ids.shape[1] : ids.shape[1] + width - n], alone.sequences[0, n:]), b
        assert torch.equal(batch.exit_layers[b, : width - n], alone.exit_layers[0]), b
        assert batch.exit_layers[b, width - n :].eq(-1).all()  # and nothing after it ended alone
    assert_every_exit_taken(batch.exit_layers, model)


# ---------------------------------------------------------------- refusals
def test_graphs_are_refused_with_processors_and_allowed_with_stop_strings_only():
    model = _model()
    settings = DecodeSettings(max_new_tokens=4, repetition_penalty=1.2)
    with pytest.raises(GenerationInputError, match=r"graphs=True cannot capture HF's logits processors"):
        DrexEngine(model, max_batch=2, max_len=16, settings=settings, thresholds=[0.5] * 3, graphs=True)
    engine = DrexEngine(model, max_batch=2, max_len=16, settings=settings, thresholds=[0.5] * 3, static_shapes=True)
    with pytest.raises(GenerationInputError, match=r"graphs=True cannot capture HF's logits processors"):
        engine.capture_graphs()  # nor later, by hand
    ids, _, _ = _batch([4])
    with pytest.raises(GenerationInputError, match=r"graphs=True cannot capture.*no_repeat_ngram_size"):
        model.generate(ids, max_new_tokens=4, no_repeat_ngram_size=2, graphs=True)
    # stop strings are checked on the host: graphs=True meets its usual CPU refusal, not this one
    with pytest.raises(GenerationInputError, match="captures CUDA graphs: the model is on cpu"):
        model.generate(ids, max_new_tokens=4, stop_strings="ab", tokenizer=char_tokenizer(), graphs=True)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(repetition_penalty=0.0), r"repetition_penalty must be a positive number \(1.0: off\), got 0.0"),
        (dict(repetition_penalty=-2), r"repetition_penalty must be a positive number .*got -2.0"),
        (dict(repetition_penalty="high"), r"repetition_penalty must be a number, got 'high'"),
        (dict(no_repeat_ngram_size=-1), r"no_repeat_ngram_size must be a non-negative integer \(0: off\), got -1"),
        (dict(no_repeat_ngram_size=2.5), r"no_repeat_ngram_size must be an integer, got 2.5"),
        (dict(min_new_tokens=-3), r"min_new_tokens must be a non-negative integer, got -3"),
        (dict(bad_words_ids=[5]), r"bad_words_ids must be a list of token-id lists.*got the entry 5"),
        (dict(bad_words_ids=[[]]), r"bad_words_ids must be a list of token-id lists.*got the entry \[\]"),
        (dict(bad_words_ids=[]), r"bad_words_ids must be a list of token-id lists.*got \[\]"),
        (dict(bad_words_ids=[[-1]]), r"bad_words_ids holds the negative token id -1"),
        (dict(bad_words_ids=[[5, 99]]), r"bad_words_ids holds token id 99 \(in \[5, 99\]\), outside .* 0..98"),
        (dict(bad_words_ids=[[2]], eos_token_id=2), r"bad_words_ids=\[\[2\]\] only names end-of-sequence ids"),
        (dict(stop_strings=""), r"stop_strings must be non-empty strings, got ''"),
        (dict(stop_strings=[3]), r"stop_strings must be non-empty strings, got 3"),
        (dict(stop_strings=[]), r"stop_strings must be a string or a list of strings, got \[\]"),
    ],
)
def test_bad_processor_options_are_clear_errors_before_any_work(options, message):
    model = _model()
    ids, _, _ = _batch([4])
    with pytest.raises(GenerationInputError, match=message):
        model.generate(ids, max_new_tokens=4, tokenizer=char_tokenizer(), **options)


# ---------------------------------------------------------------- drex generate
@pytest.fixture
def char_base_dir(tmp_path):
    folder = tmp_path / "tiny-llama-chars"
    make_tiny("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    return folder


def _cli(argv, monkeypatch):
    """Run `drex generate` in-process, recording the keyword arguments it gives generate()."""
    from drex_hf.cli.main import main

    seen = {}
    original = EarlyExitModelForCausalLM.generate

    def recording(self, *args, **kwargs):
        seen.update(kwargs)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(EarlyExitModelForCausalLM, "generate", recording)
    return main(argv), seen


def _token_line(out):
    """The tokens of `drex generate`'s per-token line for its first prompt."""
    line = out.split("--- token / exit layer\n")[1].splitlines()[0].split()
    return [eval(t.rsplit("@", 1)[0]) for t in line]  # noqa: S307 - our own repr() output


def test_drex_generate_passes_the_processor_options(char_base_dir, monkeypatch, capsys):
    base = ["generate", str(char_base_dir), "--exit-layers", "1", "--threshold", "inf", "--prompt", "abc"]
    base += ["--max-new-tokens", "12", "--chat", "off"]
    code, seen = _cli(base, monkeypatch)
    assert code == 0 and not {"repetition_penalty", "no_repeat_ngram_size", "min_new_tokens"} & set(seen)
    assert not {"bad_words_ids", "stop_strings", "tokenizer"} & set(seen)  # the defaults change nothing
    plain = _token_line(capsys.readouterr().out)
    options = ["--repetition-penalty", "1.3", "--no-repeat-ngram-size", "3", "--min-new-tokens", "2"]
    options += ["--bad-words", "Q", "--bad-words", "xyz"]
    code, seen = _cli(base + options, monkeypatch)
    assert code == 0
    assert seen["repetition_penalty"] == 1.3 and seen["no_repeat_ngram_size"] == 3 and seen["min_new_tokens"] == 2
    tokenizer = char_tokenizer()
    assert seen["bad_words_ids"] == [tokenizer(w, add_special_tokens=False)["input_ids"] for w in ("Q", "xyz")]
    processed = _token_line(capsys.readouterr().out)
    assert processed != plain and len(processed) == 12
    stop = processed[3] + processed[4]
    code, seen = _cli([*base, *options, "--stop", stop], monkeypatch)
    assert code == 0 and seen["stop_strings"] == [stop] and seen["tokenizer"] is not None
    stopped = _token_line(capsys.readouterr().out)
    assert stopped == processed[: len(stopped)] and len(stopped) <= 5 and "".join(stopped).endswith(stop)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--repetition-penalty", "0"], "argument --repetition-penalty: must be a positive number, got 0"),
        (["--no-repeat-ngram-size", "-2"], "argument --no-repeat-ngram-size: must be a non-negative integer, got -2"),
        (["--min-new-tokens", "x"], "argument --min-new-tokens: expected an integer, got 'x'"),
        (["--stop", ""], "argument --stop: must be non-empty text, got ''"),
        (["--bad-words", "  "], "argument --bad-words: must be non-empty text, got '  '"),
    ],
)
def test_drex_generate_refuses_bad_processor_options_in_one_line(extra, message, char_base_dir, capsys):
    from drex_hf.cli.main import main

    argv = ["generate", str(char_base_dir), "--exit-layers", "1", "--prompt", "abc", "--chat", "off", *extra]
    with pytest.raises(SystemExit) as exc:
        sys.exit(main(argv))
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_drex_generate_help_shows_the_processor_defaults(capsys):
    from drex_hf.cli.main import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for option, default in [("--repetition-penalty", "1.0"), ("--no-repeat-ngram-size", "0"),
                            ("--min-new-tokens", "0"), ("--bad-words", "none"), ("--stop", "none")]:  # fmt: skip
        # the option's own help (up to the next option) ends with its default
        assert re.search(rf"{option} [A-Z_]+ (?:(?! --).)*\(default: {re.escape(default)}\)", text), option
