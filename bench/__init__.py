"""The benchmark harness: data, models, fine-tuning, top-1, FLOPs, latency, the results store, plots and the CLI."""
import warnings

# timm < 1.0.26 applies `torch.jit.interface` when imported, which torch 2.14 deprecates with a FutureWarning on
# every run (torch 2.15 does not warn). It says nothing about a run, and the CLI's errors are one line.
warnings.filterwarnings("ignore", message=r"`torch\.jit\.interface` is deprecated", category=FutureWarning)
