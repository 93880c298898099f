"""Sequence-parallel attention over torch.distributed ranks (LongNet section 3.1): the plan
(`build_plan`, `spattn plan`), the runtime (`attention`) and a byte counter (`CommCounter`)."""

from spattn.distributed.attention import attention
from spattn.distributed.comm import CommCounter
from spattn.distributed.plan import DistributedPlan, PlanError, Traffic, build_plan, format_plan

__all__ = ["CommCounter", "DistributedPlan", "PlanError", "Traffic", "attention", "build_plan",
           "format_plan"]
