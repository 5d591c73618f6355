"""Training strategies behind one interface (`Strategy`): the same setup, data and seed for each."""
from .base import Side, StepResult, Strategy, TrainSetup, causal_lm_loss
from .centralized import Centralized
from .fedcybgd import FedCyBGD
from .fedlora import FedLoRA
from .hsplitlora import HSplitLoRA
from .sl import VanillaSL
from .splitfed import SplitLoRA

STRATEGY_CLASSES = {cls.name: cls for cls in (SplitLoRA, VanillaSL, FedLoRA, Centralized, FedCyBGD, HSplitLoRA)}


def make_strategy(setup: TrainSetup) -> Strategy:
    name = setup.cfg.strategy
    try:
        cls = STRATEGY_CLASSES[name]
    except KeyError:
        raise ValueError(f"strategy {name!r} is not available; choose one of {sorted(STRATEGY_CLASSES)}") from None
    return cls(setup)


__all__ = ["STRATEGY_CLASSES", "make_strategy", "Strategy", "TrainSetup", "StepResult", "Side", "causal_lm_loss",
           "SplitLoRA", "VanillaSL", "FedLoRA", "Centralized", "FedCyBGD", "HSplitLoRA"]
