//! Where and in what precision the model runs, as typed settings (`[slm.gazelle]` and the
//! command line share them): the weight dtype and the device, and opening the device.

use candle_core::{DType, Device};

/// The dtype of a part of the model's weights.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum WeightDtype {
    F32,
    Bf16,
    F16,
}

impl From<WeightDtype> for DType {
    fn from(d: WeightDtype) -> Self {
        match d {
            WeightDtype::F32 => DType::F32,
            WeightDtype::Bf16 => DType::BF16,
            WeightDtype::F16 => DType::F16,
        }
    }
}

/// Where the model runs.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error(
        "this binary was built without CUDA; rebuild with --features cuda (scripts/build-cuda)"
    )]
    NoCuda,
    #[error("cannot open CUDA device 0: {0}")]
    Cuda(#[from] candle_core::Error),
}

/// Opens the device; CUDA needs a build with `--features cuda`.
pub fn open_device(kind: DeviceKind) -> Result<Device, DeviceError> {
    match kind {
        DeviceKind::Cpu => Ok(Device::Cpu),
        DeviceKind::Cuda if cfg!(feature = "cuda") => Ok(Device::new_cuda(0)?),
        DeviceKind::Cuda => Err(DeviceError::NoCuda),
    }
}

/// Free memory on `device` in bytes, if it can be told: for CUDA the driver's free memory, for
/// the CPU the kernel's `MemAvailable` (memory that can be had without swapping).
pub(crate) fn free_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => {
            let info = std::fs::read_to_string("/proc/meminfo").ok()?;
            let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(kib * 1024)
        }
        #[cfg(feature = "cuda")]
        Device::Cuda(_) => {
            let cuda = device.as_cuda_device().ok()?;
            let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
            Some(free as u64)
        }
        #[allow(unreachable_patterns)]
        _ => None,
    }
}
