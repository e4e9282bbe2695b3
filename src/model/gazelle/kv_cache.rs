//! The per-call KV cache: every layer's keys and values, preallocated and written in place (a
//! decode step never concatenates the history), grown by doubling up to the context limit, and
//! cut back on barge-in.

use candle_core::{DType, Device, Result, Tensor};

use super::config::TextConfig;

/// Per-call key/value cache for every layer, preallocated and grown by doubling.
#[derive(Debug, Clone)]
pub struct KvCache {
    /// Per layer (k, v), each [1, KV, capacity, hd]; only the first `len` positions are valid.
    layers: Vec<(Tensor, Tensor)>,
    len: usize,
    capacity: usize,
    kv_heads: usize,
    head_dim: usize,
    max_len: usize,
}

impl KvCache {
    /// An empty cache with room for `capacity` positions before it has to grow.
    pub(crate) fn new(
        cfg: &TextConfig,
        capacity: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let capacity = capacity.clamp(1, cfg.max_position_embeddings.max(1));
        let shape = (1, cfg.num_key_value_heads, capacity, cfg.head_dim);
        let layers = (0..cfg.num_hidden_layers)
            .map(|_| {
                Ok((
                    Tensor::zeros(shape, dtype, device)?,
                    Tensor::zeros(shape, dtype, device)?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            layers,
            len: 0,
            capacity,
            kv_heads: cfg.num_key_value_heads,
            head_dim: cfg.head_dim,
            max_len: cfg.max_position_embeddings,
        })
    }

    /// Number of valid positions (the next token's position id).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Every layer's valid keys and values, flattened, for exact comparisons.
    #[cfg(test)]
    pub(crate) fn contents(&self) -> Vec<Vec<f32>> {
        self.layers
            .iter()
            .flat_map(|(k, v)| [k, v])
            .map(|t| {
                t.narrow(2, 0, self.len)
                    .and_then(|t| t.to_dtype(DType::F32))
                    .and_then(|t| t.flatten_all())
                    .and_then(|t| t.to_vec1())
                    .expect("readable cache")
            })
            .collect()
    }

    #[cfg(test)]
    pub(crate) fn capacity(&self) -> usize {
        self.capacity
    }

    /// The most positions it can ever hold (`max_position_embeddings`, or a lower limit).
    pub(crate) fn max_len(&self) -> usize {
        self.max_len
    }

    /// Caps the positions it may hold below `max_position_embeddings`, bounding its memory.
    pub(crate) fn limit(&mut self, max_len: usize) {
        self.max_len = self.max_len.min(max_len.max(1));
    }

    /// Counts `n` positions just written to every layer as valid.
    pub(super) fn advance(&mut self, n: usize) {
        self.len += n;
    }

    /// Forgets every position from `len` on (barge-in, or a re-prefill from a common prefix).
    pub(crate) fn truncate(&mut self, len: usize) {
        self.len = self.len.min(len);
    }

    /// Makes room for `extra` more positions, growing the buffers by doubling.
    pub(super) fn reserve(&mut self, extra: usize) -> Result<()> {
        let needed = self.len + extra;
        if needed > self.max_len {
            candle_core::bail!(
                "sequence of {needed} positions exceeds the context limit of {}",
                self.max_len
            );
        }
        if needed <= self.capacity {
            return Ok(());
        }
        self.grow_to(needed.max(self.capacity * 2).min(self.max_len))
    }

    /// Grows the buffers to hold exactly `positions` (at most the limit), so that a memory pool
    /// can grant a reply its room up front; never shrinks.
    pub(crate) fn ensure_capacity(&mut self, positions: usize) -> Result<()> {
        let positions = positions.min(self.max_len);
        if positions <= self.capacity {
            return Ok(());
        }
        self.grow_to(positions)
    }

    /// Frees the buffers (an idle call's cache evicted to make room); the positions are lost,
    /// and the call's next turn recomputes them.
    pub(crate) fn release(&mut self) -> Result<()> {
        for (k, v) in self.layers.iter_mut() {
            let shape = (1, self.kv_heads, 1, self.head_dim);
            *k = Tensor::zeros(shape, k.dtype(), k.device())?;
            *v = Tensor::zeros(shape, v.dtype(), v.device())?;
        }
        self.len = 0;
        self.capacity = 1;
        Ok(())
    }

    /// Positions allocated (the memory it holds, in positions).
    pub(crate) fn allocated(&self) -> usize {
        self.capacity
    }

    /// A copy of positions `from..self.len()` of every layer, to put back with [`Self::restore`].
    pub(crate) fn snapshot(&self, from: usize) -> Result<Vec<(Tensor, Tensor)>> {
        let n = self.len.saturating_sub(from);
        self.layers
            .iter()
            .map(|(k, v)| {
                // A copy of its own: the cache's buffer is overwritten in place afterwards.
                Ok((
                    k.narrow(2, from, n)?.force_contiguous()?,
                    v.narrow(2, from, n)?.force_contiguous()?,
                ))
            })
            .collect()
    }

    /// Puts back a [`Self::snapshot`] taken at `from`: afterwards positions `..from` are as they
    /// are now and the rest are the snapshot's, exactly.
    pub(crate) fn restore(&mut self, from: usize, saved: &[(Tensor, Tensor)]) -> Result<()> {
        let n = saved.first().map_or(Ok(0), |(k, _)| k.dim(2))?;
        self.truncate(from);
        if self.len < from {
            candle_core::bail!("cannot restore at {from}: only {} positions kept", self.len);
        }
        self.reserve(n)?;
        for ((ck, cv), (k, v)) in self.layers.iter().zip(saved) {
            ck.slice_set(k, 2, from)?;
            cv.slice_set(v, 2, from)?;
        }
        self.len = from + n;
        Ok(())
    }

    /// Copies the valid positions into new buffers of `capacity` positions.
    fn grow_to(&mut self, capacity: usize) -> Result<()> {
        for (k, v) in self.layers.iter_mut() {
            let shape = (1, self.kv_heads, capacity, self.head_dim);
            let (nk, nv) = (
                Tensor::zeros(shape, k.dtype(), k.device())?,
                Tensor::zeros(shape, v.dtype(), v.device())?,
            );
            if self.len > 0 {
                nk.slice_set(&k.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
                nv.slice_set(&v.narrow(2, 0, self.len)?.contiguous()?, 2, 0)?;
            }
            (*k, *v) = (nk, nv);
        }
        self.capacity = capacity;
        Ok(())
    }

    /// One layer's whole preallocated (k, v), for kernels that write or read it directly.
    pub(super) fn layer(&self, layer: usize) -> (&Tensor, &Tensor) {
        let (k, v) = &self.layers[layer];
        (k, v)
    }

    /// Writes [1, KV, L, hd] keys/values at `self.len` and returns views of all valid positions.
    pub(super) fn write(
        &mut self,
        layer: usize,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let (ck, cv) = &self.layers[layer];
        let total = self.len + k.dim(2)?;
        ck.slice_set(k, 2, self.len)?;
        cv.slice_set(v, 2, self.len)?;
        Ok((ck.narrow(2, 0, total)?, cv.narrow(2, 0, total)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_grows_and_truncates() {
        let cfg = TextConfig {
            num_hidden_layers: 1,
            num_key_value_heads: 1,
            head_dim: 2,
            max_position_embeddings: 64,
            ..TextConfig::llama2_7b()
        };
        let mut c = KvCache::new(&cfg, 2, DType::F32, &Device::Cpu).unwrap();
        let kv = |x: f32, n: usize| Tensor::full(x, (1, 1, n, 2), &Device::Cpu).unwrap();
        c.reserve(2).unwrap();
        c.write(0, &kv(1., 2), &kv(1., 2)).unwrap();
        c.advance(2);
        c.reserve(3).unwrap();
        assert!(c.capacity() >= 5);
        let (k, _) = c.write(0, &kv(2., 3), &kv(2., 3)).unwrap();
        c.advance(3);
        let k: Vec<f32> = k.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(k, vec![1., 1., 1., 1., 2., 2., 2., 2., 2., 2.]);
        c.truncate(1);
        assert_eq!(c.len(), 1);
        assert!(c.reserve(100).is_err(), "past max_position_embeddings");
    }
}
