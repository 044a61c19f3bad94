"""Per-exit thresholds that meet an agreement target with probability ≥ 1 − delta (Learn-then-Test).

Input: for every generated token and every exit point, the exit's confidence and whether the exit's
token equals the full-depth token at that position. The prompts are split in two: on the *learn*
part, candidate threshold vectors are fitted for a fixed ladder of per-exit agreement levels, from
strict to loose; on the *test* part, each candidate's agreement (first passing exit decides, tokens
that never exit agree) is tested against H0: agreement < target with a binomial (or Hoeffding, or
Hoeffding-Bentkus) p-value, in that fixed order, stopping at the first candidate not rejected at
level delta. Fixed-sequence testing needs no multiplicity correction, so the loosest rejected
candidate meets the target with probability ≥ 1 − delta over the test tokens — treated as
exchangeable, which is why whole prompts, not tokens, are split. `sequences` runs the same test
over whole generated answers, one loss per prompt.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from drex_hf.config import thresholds_to_json
from drex_hf.errors import DrexError

# Per-exit agreement levels the candidates are fitted for, strict -> loose.
LEVELS = (0.9999, 0.999, 0.998, 0.995, 0.99, 0.985, 0.98, 0.97, 0.96, 0.95, 0.94, 0.93, 0.92, 0.9, 0.88, 0.85, 0.8)
BOUNDS = ("binomial", "hoeffding", "hoeffding_bentkus")
MIN_EXITS_FOR_THRESHOLD = 10  # a threshold fitted on fewer passing tokens is noise


class CalibrationDataError(DrexError, ValueError):
    """Too little (or unusable) held-out data for the requested guarantee."""


@dataclass
class Observations:
    """confidence/agree `[exits, N]` over N generated tokens; `prompt [N]`: which prompt each came from.

    `measure` names the confidence measure of `confidence`; `others` holds the same tokens'
    confidences under other measures the heads support (`with_measure` switches to one)."""

    confidence: torch.Tensor
    agree: torch.Tensor
    prompt: torch.Tensor
    measure: str = "max_prob"
    others: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.confidence.shape != self.agree.shape or self.confidence.dim() != 2:
            raise CalibrationDataError(
                f"confidence {tuple(self.confidence.shape)} and agree {tuple(self.agree.shape)} must both be [exits, N]"
            )
        if self.prompt.shape != (self.confidence.shape[1],):
            raise CalibrationDataError(f"prompt must be [N={self.confidence.shape[1]}], got {tuple(self.prompt.shape)}")
        for name, other in self.others.items():
            if other.shape != self.confidence.shape:
                raise CalibrationDataError(f"{name} confidences {tuple(other.shape)} differ from {self.measure}'s")
        self.agree = self.agree.bool()

    @property
    def tokens(self) -> int:
        return int(self.confidence.shape[1])

    @property
    def measures(self) -> list[str]:
        return [self.measure, *self.others]

    def with_measure(self, measure: str) -> Observations:
        """The same tokens with `measure`'s confidences."""
        if measure == self.measure:
            return self
        if measure not in self.others:
            raise CalibrationDataError(f"no {measure} confidences were observed (have: {', '.join(self.measures)})")
        rest = {self.measure: self.confidence, **{k: v for k, v in self.others.items() if k != measure}}
        return Observations(self.others[measure], self.agree, self.prompt, measure, rest)

    def subset(self, mask: torch.Tensor) -> Observations:
        others = {k: v[:, mask] for k, v in self.others.items()}
        return Observations(self.confidence[:, mask], self.agree[:, mask], self.prompt[mask], self.measure, others)

    def save(self, path: str | Path) -> None:
        """Write the observations as safetensors (a few bytes per token, exit and measure)."""
        from safetensors.torch import save_file

        tensors = {"confidence": self.confidence, "agree": self.agree, "prompt": self.prompt}
        tensors |= {f"confidence:{k}": v for k, v in self.others.items()}
        tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
        save_file(tensors, str(path), metadata={"measure": self.measure})

    @classmethod
    def load(cls, path: str | Path) -> Observations:
        """Read observations written by `save`; a missing or unreadable file names itself."""
        from safetensors import SafetensorError, safe_open

        path = Path(path)
        if not path.is_file():
            raise CalibrationDataError(f"no saved observations at {path}: run drex calibrate without reusing them")
        try:
            with safe_open(str(path), "pt") as f:
                measure = (f.metadata() or {}).get("measure", "max_prob")
                tensors = {k: f.get_tensor(k) for k in f.keys()}
            others = {k.split(":", 1)[1]: v.float() for k, v in tensors.items() if k.startswith("confidence:")}
            return cls(tensors["confidence"].float(), tensors["agree"], tensors["prompt"].long(), measure, others)
        except (SafetensorError, KeyError, OSError) as err:
            raise CalibrationDataError(f"{path} holds no readable observations ({err})") from None


def first_exit(confidence: torch.Tensor, thresholds: list[float]) -> torch.Tensor:
    """Index of the first exit whose confidence passes, per token; `len(thresholds)` = full depth."""
    exits, n = confidence.shape
    chosen = torch.full((n,), exits, dtype=torch.long)
    for j in reversed(range(exits)):
        chosen[confidence[j] >= thresholds[j]] = j
    return chosen


def agreement_counts(obs: Observations, thresholds: list[float]) -> tuple[int, int, list[int]]:
    """(agreeing tokens, tokens, tokens leaving at each exit) under first-passing-exit semantics."""
    chosen = first_exit(obs.confidence, thresholds)
    exits = obs.confidence.shape[0]
    agree = torch.ones(obs.tokens, dtype=torch.bool)
    for j in range(exits):
        at = chosen == j
        agree[at] = obs.agree[j][at]
    counts = [int((chosen == j).sum()) for j in range(exits)]
    return int(agree.sum()), obs.tokens, counts


def binomial_p_value(k: int, n: int, target: float) -> float:
    """P(Bin(n, target) >= k): how surprising k agreements in n would be if the agreement were only `target`."""
    if k <= 0:
        return 1.0
    if target >= 1.0:
        return 0.0 if k < n + 1 else 1.0
    i = torch.arange(k, n + 1, dtype=torch.float64)
    log_terms = (
        torch.lgamma(torch.tensor(n + 1.0, dtype=torch.float64))
        - torch.lgamma(i + 1)
        - torch.lgamma(n - i + 1)
        + i * math.log(target)
        + (n - i) * math.log1p(-target)
    )
    return float(torch.logsumexp(log_terms, 0).exp().clamp(max=1.0))


def hoeffding_p_value(k: int, n: int, target: float) -> float:
    """Hoeffding's bound on the same tail: exp(-2 n (k/n - target)^2) above the target, else 1."""
    rate = k / n if n else 0.0
    return math.exp(-2 * n * (rate - target) ** 2) if rate > target else 1.0


def risk_p_value(risk: float, n: int, alpha: float, bound: str) -> float:
    """A p-value for H0: expected loss >= `alpha`, from the mean loss `risk` of `n` independent losses
    in [0, 1]: small when so low a mean would be surprising were the expected loss `alpha` or more.

    `hoeffding`: exp(-2 n (alpha - risk)^2). `hoeffding_bentkus` (Learn-then-Test, Angelopoulos et al.
    2021, eq. for p^HB): min(exp(-n h(risk ∧ alpha, alpha)), e · P(Bin(n, alpha) <= ceil(n risk))), with
    h the Bernoulli KL divergence; valid for any losses in [0, 1]. `binomial`: P(Bin(n, alpha) <= n risk),
    exact, for 0/1 losses only.
    """
    if n <= 0:
        return 1.0
    if bound == "hoeffding":
        return math.exp(-2 * n * (alpha - risk) ** 2) if risk < alpha else 1.0
    if bound == "binomial":
        losses = round(risk * n)
        if abs(losses - risk * n) > 1e-6:
            raise CalibrationDataError(
                f"the binomial bound needs 0/1 losses; a mean loss of {risk} over {n} is not a count of failures "
                "(use hoeffding_bentkus or hoeffding)"
            )
        return binomial_p_value(n - losses, n, 1 - alpha)
    if bound == "hoeffding_bentkus":
        if risk >= alpha:
            return 1.0
        kl = math.log(1 / (1 - alpha)) if risk <= 0 else (
            risk * math.log(risk / alpha) + (1 - risk) * math.log((1 - risk) / (1 - alpha))
        )  # fmt: skip
        failures = math.ceil(n * risk - 1e-9)  # the tolerance only absorbs float error in n * risk
        bentkus = math.e * binomial_p_value(n - failures, n, 1 - alpha)  # e · P(Bin(n, alpha) <= failures)
        return min(math.exp(-n * kl), bentkus, 1.0)
    raise CalibrationDataError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")


def p_value(k: int, n: int, target: float, bound: str) -> float:
    if bound == "binomial":
        return binomial_p_value(k, n, target)
    if bound == "hoeffding":
        return hoeffding_p_value(k, n, target)
    if bound == "hoeffding_bentkus":
        return risk_p_value(1 - k / n if n else 1.0, n, 1 - target, bound)
    raise CalibrationDataError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")


def tokens_needed(target: float, delta: float, bound: str) -> int:
    """Fewest test samples (tokens here; prompts for a sequence guarantee) with which even a perfect
    score would reject H0 at level delta."""
    if bound in ("binomial", "hoeffding_bentkus"):  # nothing lost: p = target^n for both
        return math.ceil(math.log(delta) / math.log(target))
    return math.ceil(math.log(1 / delta) / (2 * (1 - target) ** 2))  # rate 1: exp(-2n(1-target)^2)


def fit_thresholds(conf: torch.Tensor, agree: torch.Tensor, target: float) -> list[float]:
    """Per exit, the lowest threshold whose passing tokens agree at >= target (inf if none do).

    Tokens are sorted by confidence; the threshold admits the largest top-confidence set whose
    agreement rate is at least `target` and which holds at least MIN_EXITS_FOR_THRESHOLD tokens.
    """
    thresholds = []
    for c, a in zip(conf, agree):
        order = c.argsort(descending=True)
        rate = a[order].double().cumsum(0) / torch.arange(1, len(c) + 1, dtype=torch.double)
        ok = (rate >= target).nonzero().flatten()
        ok = ok[ok + 1 >= MIN_EXITS_FOR_THRESHOLD]
        if len(ok) == 0:
            thresholds.append(math.inf)
            continue
        n = int(ok.max())
        # ties: everything with confidence >= c[order[n]] passes, so check that set, not the prefix
        value = float(c[order[n]])
        passing = c >= value
        while passing.sum() > 0 and a[passing].double().mean() < target:
            higher = c[c > value]
            if len(higher) == 0:
                value = math.inf
                break
            value = float(higher.min())
            passing = c >= value
        thresholds.append(value)
    return thresholds


def candidates(learn: Observations, levels: tuple[float, ...] = LEVELS) -> list[list[float]]:
    """Threshold vectors from strict to loose: no exits first, then one per level, each no stricter
    than the one before (elementwise minimum), duplicates dropped."""
    exits = learn.confidence.shape[0]
    out = [[math.inf] * exits]
    for level in levels:
        fitted = fit_thresholds(learn.confidence, learn.agree, level)
        merged = [min(a, b) for a, b in zip(out[-1], fitted)]
        if merged != out[-1]:
            out.append(merged)
    return out


@dataclass
class ThresholdResult:
    thresholds: list[float]
    target: float
    delta: float
    bound: str
    learn_tokens: int
    test_tokens: int
    test_agreement: float
    exit_fractions: list[float]
    tested: list[dict] = field(default_factory=list)  # each candidate: thresholds, agreement, p-value, rejected

    @property
    def exits_anything(self) -> bool:
        return any(math.isfinite(t) for t in self.thresholds)

    def to_dict(self) -> dict:
        return {
            "thresholds": thresholds_to_json(self.thresholds),
            "target_agreement": self.target,
            "delta": self.delta,
            "bound": self.bound,
            "learn_tokens": self.learn_tokens,
            "test_tokens": self.test_tokens,
            "test_agreement": self.test_agreement,
            "exit_fractions": self.exit_fractions,
            "tested": [dict(c, thresholds=thresholds_to_json(c["thresholds"])) for c in self.tested],
        }


def learn_prompts(prompts: torch.Tensor, learn_fraction: float, seed: int) -> torch.Tensor:
    """The prompt ids (of the distinct ids `prompts`) that go to the learn part; the rest are tested."""
    order = prompts[torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))]
    return order[: max(1, round(learn_fraction * len(prompts)))]


def split_by_prompt(obs: Observations, learn_fraction: float, seed: int) -> tuple[Observations, Observations]:
    learn = torch.isin(obs.prompt, learn_prompts(obs.prompt.unique(), learn_fraction, seed))
    return obs.subset(learn), obs.subset(~learn)


def learn_then_test(
    obs: Observations,
    target: float,
    delta: float,
    *,
    bound: str = "binomial",
    learn_fraction: float = 0.5,
    seed: int = 0,
    levels: tuple[float, ...] = LEVELS,
    enabled: list[bool] | None = None,
) -> ThresholdResult:
    """Thresholds meeting `target` agreement with probability >= 1 - delta (see the module docstring).
    `enabled`: exits allowed to open (chosen beforehand, e.g. on the learn half); the rest stay +inf."""
    if not 0 < target < 1:
        raise CalibrationDataError(f"target agreement must be in (0, 1), got {target}")
    if not 0 < delta < 1:
        raise CalibrationDataError(f"delta must be in (0, 1), got {delta}")
    if not 0 < learn_fraction < 1:
        raise CalibrationDataError(f"learn_fraction must be in (0, 1), got {learn_fraction}")
    if bound not in BOUNDS:
        raise CalibrationDataError(f"unknown bound {bound!r}; choose one of {', '.join(BOUNDS)}")
    if len(obs.prompt.unique()) < 2:
        raise CalibrationDataError("need tokens from at least 2 prompts: learn and test are split by prompt")
    learn, test = split_by_prompt(obs, learn_fraction, seed)
    needed = tokens_needed(target, delta, bound)
    if test.tokens < needed:
        total = math.ceil(needed / (1 - learn_fraction))
        raise CalibrationDataError(
            f"{test.tokens} test tokens cannot show agreement >= {target} with probability >= {1 - delta} "
            f"({bound} bound): at least {needed} test tokens are needed, about {total} in all with "
            f"learn_fraction {learn_fraction}; give more held-out text or more new tokens per prompt"
        )
    tested, chosen = [], None
    for thresholds in candidates(learn, levels):
        if enabled is not None:
            thresholds = [t if on else math.inf for t, on in zip(thresholds, enabled)]
        k, n, counts = agreement_counts(test, thresholds)
        p = 0.0 if not any(math.isfinite(t) for t in thresholds) else p_value(k, n, target, bound)
        rejected = p <= delta
        tested.append(
            {"thresholds": thresholds, "agreement": k / n, "p_value": p, "rejected": rejected, "exits": counts}
        )
        if not rejected:
            break
        chosen = (thresholds, k / n, [c / n for c in counts])
    assert chosen is not None  # the no-exit candidate always agrees and is always "rejected"
    thresholds, agreement, fractions = chosen
    return ThresholdResult(
        thresholds=thresholds,
        target=target,
        delta=delta,
        bound=bound,
        learn_tokens=learn.tokens,
        test_tokens=test.tokens,
        test_agreement=agreement,
        exit_fractions=fractions,
        tested=tested,
    )
