"""The project's shared vocabulary: the names of tasks, evidence-horizon buckets and risk tiers.

Each is defined here once and imported everywhere else (configuration checks, prompt templates,
tools, curriculum, metrics, planner, Serve). This module imports nothing from ``reasonrec`` so
any module can use it without an import cycle. Order matters: the tuples' positions are used as
stable codes (e.g. bucket code 0/1/2, a task's index in template seeding).
"""

from __future__ import annotations

TASKS = ("sequential", "direct", "ctr", "explanation")
"""The four recommendation tasks (paper section 4): sequential (next item over the whole catalog),
direct (pick from a candidate list), ctr (will the user click/buy this item: yes/no) and
explanation (write the user's review of an item)."""

TOOL_TASKS = ("sequential", "direct", "ctr")
"""The tasks a classical tool (the planner's skill repository, paper section 3.3) can answer:
every task but explanation, which only the VLM handles."""

EH_BUCKETS = ("low", "medium", "high")
"""Evidence-horizon (EH) buckets (paper section 3.2): the user's EH value C(u) in [0, 1]
(1 = no training evidence, cold) cut at the configured thresholds. ``low`` = dense, well-known
user; ``high`` = sparse or cold user. Codes 0/1/2 follow this order."""

RISK_TIERS = ("low", "medium", "high")
"""The planner's risk tiers (paper section 3.3): ``low`` = a tool answered (the VLM is bypassed);
``medium`` = the VLM answers alone; ``high`` = the VLM answers while consulting the tools."""
