"""The `drex` command line: one entry point, one module per subcommand.

`COMMANDS` is what `drex --help` lists; a subcommand's module (and with it torch) is imported only
when that subcommand runs or shows its own help.
"""

COMMANDS = {
    "env": "print versions, the device and whether Triton kernels can run",
    "generate": "generate text with per-token early exit",
    "train": "train exit heads from a YAML recipe",
    "distill": "train a draft layer (one decoder layer after an exit) for self_spec on the model's own answers",
    "calibrate": "fit thresholds with a quality guarantee and the scheduler's cost constants for this device",
    "bench": "full / batch_all / batch_majority / drex (and HF generate) side by side on the same prompts",
    "serve": "an OpenAI-compatible HTTP server (completions, chat, streaming, /metrics) over continuous batching",
    "demo": "answer a few prompts with SmolLM2-135M-Instruct, full depth vs per-token early exit",
}
