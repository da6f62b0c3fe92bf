"""The fast path's ``--fused_adamw``: fused AdamW where this torch has it for the device (``--compile`` is
``torch.compile`` in the entry points, ``--no_host_sync`` the step logger of ``util/step_log.py``)."""
import torch


def fused_adamw(device):
    """``--fused_adamw``: True (``AdamW(fused=True)``: one kernel for all tensors, and the device-side step skip of
    ``--no_host_sync``) where this torch has fused AdamW for ``device``, else None (the default AdamW) with a note."""
    problem = fused_adamw_problem(device)
    if problem is None:
        return True
    print(f"Note: --fused_adamw: torch {torch.__version__} has no fused AdamW for --device {device} ({problem}); "
          f"using the default AdamW")
    return None


def fused_adamw_problem(device):
    """None if fused AdamW runs on ``device``, else why not. torch checks the device only at the first step (CPU
    support came in torch 2.4), so one step on a one-element tensor tells."""
    try:
        p = torch.zeros(1, device=device, requires_grad=True)
        p.grad = torch.zeros(1, device=device)
        torch.optim.AdamW([p], fused=True).step()
    except (RuntimeError, TypeError) as e:
        return (str(e).splitlines() or [type(e).__name__])[0]
    return None
