"""The optimizers of the distributed Sophia test (shared by the worker and the single-process oracle)."""
import hessopt

CASES = ("sophia_h", "sophia_g", "adahessian_fd")


def make(name, params):
    if name == "sophia_h":
        return hessopt.Sophia(params, lr=0.02, update_each=2, curvature="hutchinson", seed=3)
    if name == "sophia_g":
        return hessopt.Sophia(params, lr=0.02, update_each=2, curvature="gnb", seed=3)
    return hessopt.AdaHessian(params, lr=0.05, curvature=hessopt.FiniteDifference(scheme="central"), seed=3)
