"""The shape shared by every optimizer wrapper in the library.

A wrapper *is* a ``torch.optim.Optimizer`` (isinstance holds, step and
state-dict hooks work, LR schedulers accept it) but owns no parameters of its
own: ``param_groups``, ``state`` and ``defaults`` are the inner optimizer's
objects, forwarded, so a scheduler on the wrapper changes the inner learning
rate and ``add_param_group`` reaches the inner optimizer.

Every wrapper counts its optimizer steps in ``step_count`` and saves the
count under the checkpoint key ``"step_count"``.
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from typing import Any

import torch

from lookahead_dist.errors import ConfigError

__all__ = ["STEP_KEY", "WrapperOptimizer", "saved_step_count"]

#: The checkpoint key of a wrapper's step counter (written ``"step"`` by Decentralized and SlowMo before).
STEP_KEY = "step_count"


def saved_step_count(own: dict, where: str) -> int:
    """The step counter saved in a wrapper's own checkpoint entry ``own``; the former key ``"step"`` still loads."""
    if STEP_KEY in own:
        return int(own[STEP_KEY])
    if "step" in own:
        warnings.warn(
            f"{where}: the checkpoint stores its step counter under the former key 'step'; "
            f"saving it again writes {STEP_KEY!r}",
            DeprecationWarning,
            stacklevel=3,
        )
        return int(own["step"])
    raise ConfigError(f"{where}: the checkpoint has no step counter ({STEP_KEY!r}); its keys are {sorted(own)}")


class WrapperOptimizer(torch.optim.Optimizer):
    """Base of the wrappers: forwards the inner optimizer's groups, state and defaults.

    Subclasses implement ``step`` (decorated as usual) and their own state dict.
    ``torch.optim.Optimizer.__init__`` is not called (it would copy the param
    groups); the attributes it creates are created here instead.
    """

    def __init__(self, optimizer: torch.optim.Optimizer):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise ConfigError(
                f"{type(self).__name__}: optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}"
            )
        self.optimizer = optimizer
        self._init_base_attributes()

    def _init_base_attributes(self) -> None:
        """What ``torch.optim.Optimizer.__init__`` creates besides the groups (also after unpickling)."""
        self._optimizer_step_pre_hooks = OrderedDict()
        self._optimizer_step_post_hooks = OrderedDict()
        self._optimizer_state_dict_pre_hooks = OrderedDict()
        self._optimizer_state_dict_post_hooks = OrderedDict()
        self._optimizer_load_state_dict_pre_hooks = OrderedDict()
        self._optimizer_load_state_dict_post_hooks = OrderedDict()
        self._warned_capturable_if_run_uncaptured = True
        self._patch_step_function()

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return self.optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value) -> None:
        self.optimizer.param_groups = value

    @property
    def state(self):
        return self.optimizer.state

    @state.setter
    def state(self, value) -> None:
        self.optimizer.state = value

    @property
    def defaults(self) -> dict[str, Any]:
        return self.optimizer.defaults

    @defaults.setter
    def defaults(self, value) -> None:
        self.optimizer.defaults = value

    @torch._disable_dynamo
    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def add_param_group(self, param_group: dict) -> None:
        self.optimizer.add_param_group(param_group)

    @property
    def k(self) -> int:
        """Deprecated name of ``step_count``."""
        warnings.warn(f"{type(self).__name__}.k is deprecated; read step_count", DeprecationWarning, stacklevel=2)
        return self.step_count

    @k.setter
    def k(self, value: int) -> None:
        warnings.warn(f"{type(self).__name__}.k is deprecated; set step_count", DeprecationWarning, stacklevel=2)
        self.step_count = value

    def base_lr(self) -> float:
        """The learning rate of the first param group (what the slow-momentum rule calls gamma)."""
        return float(self.optimizer.param_groups[0]["lr"])
