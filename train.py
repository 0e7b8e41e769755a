"""Train a model: ``python train.py [hydra overrides]`` (see configs/train.yaml and the README)."""

from distill.train import main

if __name__ == "__main__":
    main()
