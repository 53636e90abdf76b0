"""The Proxy-RLHF proxy: a small head that judges the frozen target's proposals, and its PPO policy view.

Input per decision (built by alignfast.rollout.ProxyDecoder, F = H + E + 1):
    [ h_t (the target's last hidden state at the position) | e(y) (the target's frozen input embedding of
      the proposal y) | log pi_F(y | ...) (the target's own log-prob of y) ]
ProxyModel: LayerNorm (no affine) on h and on e, then

    u = tanh(W [norm(h) ; norm(e) ; lp] + b)          (proxy_hidden_size units)
    accept logit a = w_pi . u + b_pi                    P(accept) = sigmoid(a / temperature)
    value        v = w_v . u + b_v                      (the critic, sharing u)

With proxy_hidden_size d the head has (H + E + 1) d + 3 d + 2 parameters: for the toy target (H = E = 96,
337 k parameters) d = 16 gives 3 138 (0.93 %); for an 8B Llama (H = E = 4096) d = 256 gives 2.1 M (0.03 %).
The accept bias starts at +2 (P(accept) = 0.88): the untrained proxy mostly lets the target speak.

ProxyPolicy is what the PPO core calls (alignfast.trainer.ppo_core.PPOUpdater): the actions are the
decisions (response_ids: 1 accept, 0 reject) and `features` carries the proxy's inputs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

from alignfast.files import readable_weights
from alignfast.trainer.policy import PolicyOutput

CONFIG_NAME = "proxy_config.json"
WEIGHTS_NAME = "proxy.safetensors"


class ProxyModel(nn.Module):
    """P(accept) and a value from the proxy features (see the module docstring)."""

    def __init__(self, hidden_size: int, embed_size: int, proxy_hidden_size: int = 64, accept_bias: float = 2.0):
        super().__init__()
        self.hidden_size, self.embed_size, self.proxy_hidden_size = int(hidden_size), int(embed_size), int(proxy_hidden_size)
        self.accept_bias = float(accept_bias)
        self.inp = nn.Linear(self.hidden_size + self.embed_size + 1, self.proxy_hidden_size)
        self.policy_head = nn.Linear(self.proxy_hidden_size, 1)
        self.value_head = nn.Linear(self.proxy_hidden_size, 1)
        nn.init.zeros_(self.policy_head.weight)
        nn.init.constant_(self.policy_head.bias, self.accept_bias)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)
        # {name, weights, vocab_size} of the target the proxy was trained on (its trainer sets it when it saves;
        # proxy_config.json's "target"): a proxy reads one target's hidden states and token embeddings, and a
        # folder saved before this was recorded loads with None.
        self.trained_on: dict | None = None

    @property
    def feature_size(self) -> int:
        return self.hidden_size + self.embed_size + 1

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features [..., F] -> (accept logits [...], values [...]), float32."""
        if features.shape[-1] != self.feature_size:
            raise ValueError(f"alignfast: argument 'features' has {features.shape[-1]} columns, the proxy expects "
                             f"{self.feature_size} (hidden {self.hidden_size} + embedding {self.embed_size} + 1)")
        x = features.to(self.inp.weight.dtype)
        h = nn.functional.layer_norm(x[..., :self.hidden_size], (self.hidden_size,))
        e = nn.functional.layer_norm(x[..., self.hidden_size:self.hidden_size + self.embed_size], (self.embed_size,))
        u = torch.tanh(self.inp(torch.cat([h, e, x[..., -1:]], dim=-1)))
        return self.policy_head(u).squeeze(-1).float(), self.value_head(u).squeeze(-1).float()

    def judge(self, features: torch.Tensor, proposals: torch.Tensor):
        """The decoder's judge interface."""
        return self(features)

    # --- save / load (the trainer's save_model and checkpoints call save_pretrained) ---------------
    def config_dict(self) -> dict:
        return {"hidden_size": self.hidden_size, "embed_size": self.embed_size,
                "proxy_hidden_size": self.proxy_hidden_size, "accept_bias": self.accept_bias}

    def save_pretrained(self, path) -> None:
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        config = {**self.config_dict(), **({"target": self.trained_on} if self.trained_on else {})}
        (path / CONFIG_NAME).write_text(json.dumps(config, indent=2))
        save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(path / WEIGHTS_NAME))
        readable_weights(path)  # safetensors writes 0600

    @classmethod
    def from_pretrained(cls, path) -> ProxyModel:
        from safetensors.torch import load_file

        path = Path(path)
        if not (path / CONFIG_NAME).is_file():
            raise FileNotFoundError(f"alignfast: {path} holds no {CONFIG_NAME} (not a saved proxy)")
        config = json.loads((path / CONFIG_NAME).read_text())
        trained_on = config.pop("target", None)
        model = cls(**config)
        model.load_state_dict(load_file(str(path / WEIGHTS_NAME)))
        model.trained_on = trained_on if isinstance(trained_on, dict) else None
        return model


class ProxyPolicy:
    """The proxy seen by the PPO core: log-probs, entropy and values of the accept/reject decisions.

    For decision logit a and temperature T: log pi(accept) = log sigmoid(a / T), log pi(reject) =
    log sigmoid(-a / T), entropy of the Bernoulli. The reference policy is a fixed Bernoulli(accept_prior)
    ("let the target speak"): log pi_ref(accept) = log accept_prior, log pi_ref(reject) = log(1 - accept_prior).
    """

    def __init__(self, proxy: ProxyModel, *, accept_prior: float):
        self.proxy = proxy
        self.accept_prior = float(accept_prior)

    def forward(self, query_ids, query_mask, response_ids, response_mask, *, temperature: float,
                return_entropy: bool = False, entropy_grad: bool = False, features=None) -> PolicyOutput:
        if features is None:
            raise ValueError("alignfast: the proxy policy needs the rollout's decision features")
        R = response_ids.size(1)
        logit, values = self.proxy(features[:, :R])
        scaled = logit / temperature
        accept = response_ids == 1
        lp_acc, lp_rej = nn.functional.logsigmoid(scaled), nn.functional.logsigmoid(-scaled)
        logprobs = torch.where(response_mask, torch.where(accept, lp_acc, lp_rej), torch.zeros_like(scaled))
        values = torch.where(response_mask, values, torch.zeros_like(values))
        entropy = None
        if return_entropy:
            p = torch.sigmoid(scaled)
            entropy = -(p * lp_acc + (1 - p) * lp_rej)
            entropy = torch.where(response_mask, entropy, torch.zeros_like(entropy))
            if not entropy_grad:
                entropy = entropy.detach()
        return PolicyOutput(logprobs=logprobs, entropy=entropy, values=values)

    def reference_logprobs(self, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        lp = torch.where(actions == 1, torch.full(actions.shape, math.log(self.accept_prior), device=actions.device),
                         torch.full(actions.shape, math.log1p(-self.accept_prior), device=actions.device))
        return torch.where(mask, lp, torch.zeros_like(lp))
