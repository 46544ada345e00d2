"""The choice between a kernel's Triton and Mosaic GPU lowerings, shared by the ops that have both."""

import jax

LOWERINGS = ("auto", "triton", "mosaic")


def on_hopper() -> bool:
  """Whether the default device is a Hopper GPU (compute capability 9.0), where the Mosaic GPU kernels run."""
  if jax.default_backend() != "gpu":
    return False
  return getattr(jax.devices()[0], "compute_capability", "") in ("9.0", "9.0a")


def use_mosaic(choice: str, option: str, fits: bool, interpret: bool, needs: str) -> bool:
  """Whether to run the Mosaic GPU kernels.

  Args:
    choice: "auto" (Mosaic GPU on a Hopper GPU where the shapes fit, Triton otherwise), "triton" or "mosaic".
    option: the config field's name, for the messages.
    fits: whether the Mosaic GPU kernels can run these shapes and dtypes.
    interpret: the Pallas interpreter (Triton's; CPU tests): never Mosaic GPU.
    needs: what "mosaic" needs, and what it got, for the message when it cannot run.
  """
  if choice not in LOWERINGS:
    raise ValueError(f"{option} must be 'auto', 'triton' or 'mosaic', not {choice!r}")
  if choice == "mosaic":
    if not fits or interpret:
      raise ValueError(f"{option}='mosaic' needs {needs}. Use 'auto' to fall back to Triton.")
    return True
  return choice == "auto" and fits and not interpret and on_hopper()
