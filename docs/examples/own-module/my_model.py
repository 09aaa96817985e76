"""A user's own model and data, as inferopt sees them: a factory with arguments and a function
returning a torch Dataset. Used by docs/model-sources.md (and its test)."""

import torch


class TabularNet(torch.nn.Module):
    """A small MLP that returns a dict, as many real models do."""

    def __init__(self, features: int = 32, hidden: int = 256, classes: int = 10) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(
            torch.nn.Linear(features, hidden), torch.nn.GELU(),
            torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
        )
        self.head = torch.nn.Linear(hidden, classes)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        embedding = self.body(x)
        return {"embedding": embedding, "logits": self.head(embedding)}


def build(hidden: int = 256, seed: int = 0) -> TabularNet:
    torch.manual_seed(seed)
    return TabularNet(hidden=hidden).eval()


def dataset(samples: int = 1024) -> torch.utils.data.Dataset:
    """(features, label) pairs: labels from a fixed random linear rule, so they are learnable."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(samples, 32, generator=g)
    y = (x @ torch.randn(32, 10, generator=g)).argmax(-1)
    return torch.utils.data.TensorDataset(x, y)
