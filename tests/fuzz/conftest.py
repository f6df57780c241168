"""Hypothesis profiles for the fuzz suite: a modest budget in `make test`, a large one in
`make fuzz`.

HYPOTHESIS_PROFILE=fuzz (set by `make fuzz`) selects the long run: 25,000 examples per
property, about 50 minutes on a 2-core machine; the normal budget is 100 (the fuzz part of
`make test` takes 10-25 s). Examples that failed are kept under .pytest_cache (ignored by
git) and replayed first next time.
"""

from __future__ import annotations

import os
from pathlib import Path

from hypothesis import HealthCheck, Phase, settings
from hypothesis.database import DirectoryBasedExampleDatabase

_DATABASE = DirectoryBasedExampleDatabase(
    str(Path(__file__).resolve().parents[2] / ".pytest_cache" / "hypothesis")
)
# Generated streams are large by Hypothesis's standards, and a shared 2-core machine
# makes timings noisy: neither is a finding.
_QUIET = [HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.large_base_example]

# No "explain" phase: it reruns a failing case hundreds of times to say which lines only
# failures reach, which costs more than the fuzzing itself here.
_PHASES = [Phase.explicit, Phase.reuse, Phase.generate, Phase.target, Phase.shrink]

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    database=_DATABASE,
    suppress_health_check=_QUIET,
    phases=_PHASES,
)
settings.register_profile(
    "fuzz",
    max_examples=25_000,
    deadline=None,
    database=_DATABASE,
    suppress_health_check=_QUIET,
    phases=_PHASES,
    print_blob=True,
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))
