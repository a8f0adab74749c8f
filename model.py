"""The quick start's CNN, a run's settings and its train state; `python model.py`: a summary."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state


class CNN(nn.Module):
    """conv32 -> relu -> avgpool -> conv64 -> relu -> avgpool -> dense256 -> relu -> dense10, on
    images [N, 28, 28, 1]: uint8 (0 to 255), as MNIST stores them and batches travel, or float."""

    @nn.compact
    def __call__(self, x):
        if x.dtype == jnp.uint8:  # scaled here alone, so a float image is never scaled twice
            x = x.astype(jnp.float32) / 255
        x = nn.Conv(features=32, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = nn.Conv(features=64, kernel_size=(3, 3))(x)
        x = nn.relu(x)
        x = nn.avg_pool(x, window_shape=(2, 2), strides=(2, 2))
        x = x.reshape((x.shape[0], -1))
        x = nn.Dense(features=256)(x)
        x = nn.relu(x)
        x = nn.Dense(features=10)(x)
        return x


@dataclasses.dataclass(frozen=True)
class Config:
    """The settings of a training run, with the quick start's defaults."""
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    seed: int = 0


def create_train_state(model, config, images):
    """A fresh TrainState of `model` for batches like `images`: SGD, parameters from config.seed."""
    return init_state(model, (config.learning_rate, config.momentum), config.seed, images)


@functools.partial(jax.jit, static_argnums=(0, 1, 2))  # one compilation; same settings, same tx
def init_state(model, sgd_settings, seed, images):
    """A TrainState of `model` for batches like `images`: optax.sgd(*sgd_settings), seeded."""
    params = model.init(jax.random.key(seed), images)["params"]
    tx = optax.sgd(*sgd_settings)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


@dataclasses.dataclass(frozen=True)
class RunConfig(Config):
    """train.py's settings: Config's and the data's, all of them in its checkpoints."""
    dataset: str = "mnist"
    data_dir: str | None = None  # the four IDX files; None: download through TFDS


MNIST_IMAGE = np.zeros((1, 28, 28, 1), np.uint8)  # a batch of one, to shape the CNN's parameters

if __name__ == "__main__":
    print(CNN().tabulate(jax.random.key(0), MNIST_IMAGE, compute_flops=True,
                         compute_vjp_flops=True))
