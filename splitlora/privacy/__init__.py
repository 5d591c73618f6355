"""Privacy defences and their accounting.

- ``clip_and_noise``: per-example clipping and Gaussian noise of the tensors that cross the cut
  (plain torch; the codec fuses the same arithmetic into its compress kernels, see
  ``splitlora.codec.compress(..., clip=, noise_multiplier=)``).
- ``secure_generator`` / ``draw_seed`` / ``hash_gaussian``: where the noise comes from.
- ``epsilon`` / ``noise_for_epsilon`` / ``PrivacyLedger``: (epsilon, delta) through Opacus'
  accountants.
- ``privatize_update``: clipping and noise of a client's adapter update before FedAvg.
"""
from .accountant import PrivacyLedger, epsilon, noise_for_epsilon
from .adapters import privatize_update
from .clip import check_clip_args, clip_and_noise, clip_factors
from .noise import draw_seed, hash_gaussian, secure_generator

__all__ = ["PrivacyLedger", "check_clip_args", "clip_and_noise", "clip_factors", "draw_seed", "epsilon",
           "hash_gaussian", "noise_for_epsilon", "privatize_update", "secure_generator"]
