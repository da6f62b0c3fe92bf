"""LARS (layer-wise adaptive rate scaling), the linear-probing optimizer of the reference (from MoCo v3)."""
import torch


class LARS(torch.optim.Optimizer):
    """SGD with momentum where the update of each matrix is rescaled by ``trust_coefficient * |w| / |g + wd * w|``.
    Parameters of one dimension or less (biases, norm scales) get neither weight decay nor rate scaling.

    The momentum buffer is kept as ``state[p]['mu']``, as in the reference, so its checkpoints' optimizer states
    load here.
    """

    def __init__(self, params, lr=0, weight_decay=0, momentum=0.9, trust_coefficient=0.001):
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            for p in g['params']:
                dp = p.grad
                if dp is None:
                    continue

                if p.ndim > 1:  # not a bias or a norm's scale/shift
                    dp = dp.add(p, alpha=g['weight_decay'])
                    param_norm = torch.norm(p)
                    update_norm = torch.norm(dp)
                    one = torch.ones_like(param_norm)
                    # the trust ratio, or 1 where either norm is zero
                    q = torch.where(param_norm > 0.,
                                    torch.where(update_norm > 0, (g['trust_coefficient'] * param_norm / update_norm),
                                                one),
                                    one)
                    dp = dp.mul(q)

                param_state = self.state[p]
                if 'mu' not in param_state:
                    param_state['mu'] = torch.zeros_like(p)
                mu = param_state['mu']
                mu.mul_(g['momentum']).add_(dp)
                p.add_(mu, alpha=-g['lr'])
        return loss
