"""Write a torch.export program to the path given (default model.pt2): a small CNN with a
dynamic batch dimension. Used by docs/model-sources.md (and its test)."""

import sys

import torch


class SmallCNN(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
            torch.nn.Conv2d(16, 32, 3, padding=1), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        )
        self.classifier = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(32 * 7 * 7, 128), torch.nn.ReLU(),
            torch.nn.Linear(128, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


if __name__ == "__main__":
    torch.manual_seed(0)
    model = SmallCNN().eval()
    batch = torch.export.Dim("batch", min=1, max=4096)
    program = torch.export.export(model, (torch.randn(8, 1, 28, 28),),
                                  dynamic_shapes=({0: batch},))
    out = sys.argv[1] if len(sys.argv) > 1 else "model.pt2"
    torch.export.save(program, out)
    print(f"wrote {out}")
