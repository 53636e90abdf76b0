"""KV caches for one decode batch: a preallocated one (the fast path) and DynamicCache (the fallback).

Why not DynamicCache everywhere: it appends each step's keys with torch.cat, copying the whole cache
once per step and layer (O(T^2) bytes moved over a completion), and it can only be filled by one
forward over the whole batch, so a batch's prefill is padded to its longest prompt.

PackedKVCache preallocates [rows, kv_heads, capacity, head_dim] per layer and writes each step's
column in place. Prefill runs in chunks of similar-length prompts, each chunk writing its keys straight
into its rows of the big buffer, right-aligned at the batch's prompt width W:

    columns  0 ........ W-w-1 | W-w ...... W-1 | W ........ W+max_new-1
    chunk    zeros, masked    | chunk prompts  | generated tokens (written step by step)
                              | (left-padded   |
                              |  to width w)   |

Masked columns hold zeros, never uninitialised memory: a masked score gets weight 0, and 0 * NaN
would still be NaN. A prompt's unit may own several rows (n samples): the writer copies its keys into
each of them, so the prompt is computed once.

It needs transformers' per-layer cache API (>= 5) and a model whose layers all use full attention;
otherwise the engine falls back to DynamicCache (one prefill for the batch, rows copied and dropped with
reorder_cache, which every cache layer implements, linear-attention ones included).
"""

from __future__ import annotations

def packed_cache_layers(model) -> int:
    """Number of cache layers when PackedKVCache can serve this model, else 0."""
    try:
        from transformers.cache_utils import DynamicLayer, get_layer_types_and_kwargs  # noqa: F401
    except ImportError:
        return 0
    try:
        config = model.config.get_text_config(decoder=True)
        layer_types, _ = get_layer_types_and_kwargs(config)
    except Exception:  # noqa: BLE001 - any config this helper cannot read goes the safe way
        return 0
    if not layer_types or any(t != "full_attention" for t in layer_types):
        return 0
    return len(layer_types)


def _layer_classes():
    from transformers.cache_utils import Cache, DynamicLayer

    class PackedLayer(DynamicLayer):
        """One layer's [rows, heads, capacity, dim] buffers; `length` columns are valid."""

        def __init__(self, rows: int, capacity: int):
            super().__init__()
            self.rows, self.capacity, self.length = rows, capacity, 0
            self.k_buf = self.v_buf = None

        def lazy_initialization(self, key_states, value_states):
            self.dtype, self.device = key_states.dtype, key_states.device
            _, heads, _, k_dim = key_states.shape
            v_dim = value_states.shape[-1]
            self.k_buf = key_states.new_zeros(self.rows, heads, self.capacity, k_dim)
            self.v_buf = value_states.new_zeros(self.rows, heads, self.capacity, v_dim)
            self.is_initialized = True

        def _refresh(self):
            self.keys = self.k_buf[:, :, :self.length]
            self.values = self.v_buf[:, :, :self.length]

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            self.k_buf[:, :, self.length:end] = key_states
            self.v_buf[:, :, self.length:end] = value_states
            self.length = end
            self._refresh()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def get_max_length(self) -> int:
            return self.capacity

        def batch_select_indices(self, indices):
            # copy only the valid columns; the tail is written before it is ever read
            k = self.k_buf.new_empty((indices.numel(), *self.k_buf.shape[1:]))
            v = self.v_buf.new_empty((indices.numel(), *self.v_buf.shape[1:]))
            k[:, :, :self.length] = self.k_buf[indices, :, :self.length]
            v[:, :, :self.length] = self.v_buf[indices, :, :self.length]
            self.k_buf, self.v_buf, self.rows = k, v, int(indices.numel())
            self._refresh()

    class PrefillWriter(DynamicLayer):
        """A chunk's view of a PackedLayer: its keys go to rows [r0, r1) at columns [col0, col0 + w),
        row i of the big buffer taking the chunk's row expand[i]. The chunk attends to itself only."""

        def __init__(self, target: PackedLayer, r0: int, r1: int, col0: int, expand):
            super().__init__()
            self.target, self.r0, self.r1, self.col0, self.expand = target, r0, r1, col0, expand

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.target.is_initialized:
                self.target.lazy_initialization(key_states, value_states)
            cols = slice(self.col0, self.col0 + key_states.shape[-2])
            k, v = (key_states, value_states) if self.expand is None else (key_states[self.expand],
                                                                          value_states[self.expand])
            self.target.k_buf[self.r0:self.r1, :, cols] = k
            self.target.v_buf[self.r0:self.r1, :, cols] = v
            return key_states, value_states

        def get_seq_length(self) -> int:
            return 0

    class PackedKVCache(Cache):
        def __init__(self, num_layers: int, rows: int, capacity: int):
            super().__init__(layers=[PackedLayer(rows, capacity) for _ in range(num_layers)])

        def prefill_view(self, r0: int, r1: int, col0: int, expand) -> Cache:
            return Cache(layers=[PrefillWriter(layer, r0, r1, col0, expand) for layer in self.layers])

        def finish_prefill(self, width: int) -> None:
            for layer in self.layers:
                layer.length = width
                layer._refresh()

    return PackedKVCache


_PACKED_CLASS = None


def new_packed_cache(num_layers: int, rows: int, capacity: int):
    global _PACKED_CLASS
    if _PACKED_CLASS is None:
        _PACKED_CLASS = _layer_classes()
    return _PACKED_CLASS(num_layers, rows, capacity)


def new_dynamic_cache(model):
    """DynamicCache for this model's config (transformers >= 5 wants the config; 4.x takes none)."""
    from transformers import DynamicCache

    try:
        return DynamicCache(config=model.config)
    except TypeError:
        return DynamicCache()
