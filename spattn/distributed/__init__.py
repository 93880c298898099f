"""Sequence-parallel attention over torch.distributed ranks (LongNet section 3.1): the plan
(`build_plan`, `spattn plan`), the runtime (`attention`, its errors) and a byte counter
(`CommCounter`)."""

from spattn.distributed.attention import attention
from spattn.distributed.comm import CollectiveError, CommCounter, DistributedError
from spattn.distributed.plan import DistributedPlan, PlanError, Traffic, build_plan, format_plan

__all__ = ["CollectiveError", "CommCounter", "DistributedError", "DistributedPlan", "PlanError",
           "Traffic", "attention", "build_plan", "format_plan"]
