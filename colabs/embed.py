# %% [markdown]
# # Embedding jalign in your own JAX code
#
# jalign's pieces are plain functions. Here a user's *own* Flax model and *own*
# training loop use `jalign.ops.token_logprobs` (hidden states -> token log-probs
# without building the logits) and `jalign.losses.dpo_loss`; then a jalign step
# factory trains the same model through a log-prob function, without jalign's trainer.

# %%
# Setup: on a fresh runtime (e.g. Colab) clone jalign and install it; where jalign
# is installed already this cell does nothing. JALIGN_REPO: the repository to clone.
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("jalign") is None:
    repo = os.environ.get("JALIGN_REPO", "https://github.com/<you>/jalign")
    subprocess.check_call(["git", "clone", "-q", "--depth=1", repo, "jalign"])
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", "jalign"])
    sys.path.insert(0, os.path.abspath("jalign"))  # this kernel started before the install
    os.chdir(os.path.join("jalign", "colabs"))

# %%
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from jalign.data import make_preference_dataset, preference_records_from_dicts
from jalign.losses import dpo_loss
from jalign.ops import token_logprobs
from jalign.tasks import get_task
from jalign.tokenizer import builtin_tokenizer

SMALL = os.environ.get("JALIGN_NOTEBOOK_SMALL") == "1"
STEPS = 5 if SMALL else 100


# %% [markdown]
# ## Your model: any Flax module that returns hidden states and owns an unembedding

# %%
class MyLM(nn.Module):
    vocab: int = 128
    width: int = 64

    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(self.vocab, self.width)(tokens)
        x = nn.SelfAttention(num_heads=4, qkv_features=self.width)(
            x, mask=nn.make_causal_mask(tokens))
        x = nn.LayerNorm()(x + nn.Dense(self.width)(nn.gelu(x)))
        unembed = self.param("unembed", nn.initializers.normal(0.02), (self.width, self.vocab))
        return x, unembed


# %% [markdown]
# ## Your data: preference pairs (here jalign's built-in task, batched by jalign.data)

# %%
pairs = get_task("sort").preference_pairs(256, seed=0)
records, _ = preference_records_from_dicts(pairs)
batches = iter(make_preference_dataset(records, builtin_tokenizer(), batch_size=16, max_length=40, seed=0))
batch = next(batches)
print({k: v.shape for k, v in batch.items()})


# %% [markdown]
# ## Your loop: summed completion log-probs via the fused op, then DPO

# %%
model = MyLM()
params = model.init(jax.random.PRNGKey(0), batch["tokens"][:1])
reference = params


def pair_logps(params, batch):
    hidden, unembed = model.apply(params, batch["tokens"])
    logps = token_logprobs(hidden[:, :-1], unembed, batch["tokens"][:, 1:])  # [2B, T-1], float32
    mask = batch["loss_mask"][:, 1:]
    seq = jnp.where(mask > 0, logps, 0.0).sum(-1)
    return seq[0::2], seq[1::2]  # rows alternate chosen / rejected


def loss_fn(params, batch):
    chosen, rejected = pair_logps(params, batch)
    ref_chosen, ref_rejected = jax.lax.stop_gradient(pair_logps(reference, batch))
    losses, metrics = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.1)
    return losses.mean(), metrics


optimizer = optax.adam(1e-3)
opt_state = optimizer.init(params)


@jax.jit
def my_step(params, opt_state, batch):
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, metrics


for i in range(STEPS):
    params, opt_state, loss, metrics = my_step(params, opt_state, next(batches))
print(f"own model, own loop: loss {float(loss):.3f}, reward accuracy "
      f"{float(metrics['rewards/accuracies']):.2f}, margin {float(metrics['rewards/margins']):.3f}")

# %% [markdown]
# ## A jalign step factory with your own model
#
# `make_dpo_step` takes the model as a *log-prob function*
# `logprob_fn(params, batch, rng=None) -> [B, T-1]` (position t scores token t+1;
# `rng` is for dropout, unused here), so the same factory trains your model. It
# returns a pure `step(state, batch) -> (state, metrics)`: you jit it yourself and
# keep your own loop, logging and I/O. The state is a `jalign.state.TrainState`
# whose `frozen["reference"]` is the frozen reference.

# %%
import functools

from jalign import losses
from jalign.state import TrainState
from jalign.steps import make_dpo_step


def my_logprob_fn(params, batch, rng=None):
    del rng
    hidden, unembed = model.apply(params, batch["tokens"])
    return token_logprobs(hidden[:, :-1], unembed, batch["tokens"][:, 1:])


start = model.init(jax.random.PRNGKey(1), batch["tokens"][:1])
tx = optax.adamw(1e-3)
state = TrainState(step=jnp.zeros((), jnp.int32), params=start, opt_state=tx.init(start),
                   rng=jax.random.PRNGKey(2), frozen={"reference": start})
step = jax.jit(make_dpo_step(my_logprob_fn, tx,
                             loss_fn=functools.partial(losses.dpo_loss, beta=0.1, loss_type="ipo")))
for i in range(STEPS):
    state, metrics = step(state, next(batches))
print("jalign step, your model, your loop:",
      {k: round(float(v), 3) for k, v in metrics.items()
       if k in ("loss", "rewards/accuracies", "rewards/margins")})
