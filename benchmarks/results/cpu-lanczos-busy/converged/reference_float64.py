import json, sys, time, os, torch, warnings
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))))
import timm, hessopt
from torch import nn
torch.set_num_threads(1)
seed = 0
torch.manual_seed(seed); g = torch.Generator().manual_seed(seed)
model = timm.create_model("resnet18", num_classes=10, pretrained=False)
x = torch.randn(4, 3, 32, 32, generator=g); y = torch.randint(0, 10, (4,), generator=g)
model = model.double().eval()
op = hessopt.HessianOperator(model, nn.CrossEntropyLoss(), (x.double(), y), bn_mode="eval")
t = time.perf_counter()
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    r = hessopt.top_eigenvalues(op, k=5, tol=1e-8, generator=0)
out = dict(eigenvalues=r.eigenvalues.tolist(), error_bounds=r.error_bounds.tolist(), matvecs=r.num_matvecs,
           converged=r.converged, seconds=time.perf_counter() - t, loadavg=os.getloadavg(),
           warnings=[str(m.message)[:200] for m in w], command="python benchmarks/results/cpu-lanczos-busy/converged/reference_float64.py (float64 copy of the suite's resnet18 model and batch)")
print(json.dumps(out))
json.dump(out, open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "reference_float64.json"), "w"), indent=1)
