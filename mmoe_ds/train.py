"""The training entry module: `python -m mmoe_ds.train`, `deepspeed --module mmoe_ds.train`,
`accelerate launch -m mmoe_ds.train` (the code is in mmoe_ds/training/)."""
from mmoe_ds.training.main import main
from mmoe_ds.training.teardown import exit_process

__all__ = ["main"]

if __name__ == "__main__":
    # Tear gloo down before the interpreter does (mmoe_ds/training/teardown.py; issue 11 item 8): the
    # engine's process groups outlive main() through hooks held in C++.
    exit_process(main())
