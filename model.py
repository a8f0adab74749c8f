"""The CNN of the Flax quick start (Linen API), the settings of a run, its train state and its
logits of uint8 images: what train.py, infer.py and export.py share. `python model.py` prints
the model's summary."""
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state


class CNN(nn.Module):
    """conv32 -> relu -> avgpool -> conv64 -> relu -> avgpool -> dense256 -> relu -> dense10."""

    @nn.compact
    def __call__(self, x):
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
    """The settings of a training run: train.py's flags, with the quick start's defaults. Its
    checkpoint records them all; --resume goes on only with the same, but for epochs and data_dir."""
    dataset: str = "mnist"
    data_dir: str | None = None  # the four IDX files; None: download through TFDS
    epochs: int = 10
    batch_size: int = 32
    learning_rate: float = 0.01
    momentum: float = 0.9
    seed: int = 0


@functools.partial(jax.jit, static_argnames=("learning_rate", "momentum", "model"))  # one compilation, not one per op
def create_train_state(seed, learning_rate, momentum, model=CNN()):
    """A fresh TrainState: the model's parameters from jax.random.key(seed), SGD with momentum."""
    params = model.init(jax.random.key(seed), jnp.ones([1, 28, 28, 1]))["params"]
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(learning_rate, momentum))


def model_logits(state, params, images):
    """The model's logits of uint8 images, scaled to [0, 1] here: batches travel as uint8."""
    return state.apply_fn({"params": params}, images.astype(jnp.float32) / 255)


if __name__ == "__main__":
    print(CNN().tabulate(jax.random.key(0), jnp.ones((1, 28, 28, 1)),
                         compute_flops=True, compute_vjp_flops=True))
