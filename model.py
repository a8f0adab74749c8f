"""The CNN of the Flax quick start (Linen API). `python model.py` prints its summary."""
import flax.linen as nn


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


if __name__ == "__main__":
    import jax
    import jax.numpy as jnp

    print(CNN().tabulate(jax.random.key(0), jnp.ones((1, 28, 28, 1)),
                         compute_flops=True, compute_vjp_flops=True))
