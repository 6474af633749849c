"""How new tokens are picked, as a frozen (hashable, jit-static) dataclass, and the reference's sampling."""

from __future__ import annotations

import dataclasses

from dro_jax.common.errors import DroJaxError


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """How to pick each new token. `greedy` ignores temperature, top_k and top_p. `trim_incomplete_lines` is a
    rule on the decoded text, not on the tokens (see `dro_jax.judging.responses.trim_incomplete_lines`): it lives
    here so that every caller that decodes with the reference's rules applies it too."""

    greedy: bool = True
    temperature: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    top_p: float = 1.0  # 1 = no nucleus filter
    max_new_tokens: int = 64
    min_new_tokens: int = 0
    trim_incomplete_lines: bool = False

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise DroJaxError(f"max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise DroJaxError(f"min-new-tokens must be between 0 and max-new-tokens ({self.max_new_tokens}), got {self.min_new_tokens}")
        if not 0 < self.top_p <= 1:
            raise DroJaxError(f"top-p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise DroJaxError(f"top-k must be 0 (off) or positive, got {self.top_k}")
        if self.temperature < 0:
            raise DroJaxError(f"temperature must be non-negative, got {self.temperature}")

    @property
    def is_greedy(self) -> bool:
        """Temperature 0 is greedy decoding."""
        return self.greedy or self.temperature == 0


@dataclasses.dataclass(frozen=True)
class SetSampling:
    """Decoding per kind of query: the reference lets replies to harmful queries run longer (300 new tokens)
    than replies to harmless ones (200), so one set of queries may need two decodings."""

    harmful: SamplingConfig
    harmless: SamplingConfig

    @classmethod
    def same(cls, sampling: SamplingConfig) -> "SetSampling":
        return cls(sampling, sampling)

    def by_name(self) -> dict[str, SamplingConfig]:
        """Keyed by the names the run gives its held-out sets."""
        return {"harmful": self.harmful, "harmless": self.harmless}


REFERENCE_SAMPLING = SamplingConfig(greedy=False, temperature=1.0, top_p=0.9, top_k=50)
"""The paper's sampling (temperature 1, top-p 0.9, top-k 50): sampled labels, sampled evaluation and the
command line's decoding defaults all start from it."""
