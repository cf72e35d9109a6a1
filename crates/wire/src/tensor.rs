//! Hidden states on the wire: `{dtype, rows, cols, little-endian bytes}`.

use half::f16;

use crate::codec::{Reader, Writer};
use crate::{MAX_FRAME, WireError};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DType {
    /// The default: a pipeline over the wire is bit-identical to one process.
    F32,
    /// Half the bytes, for slow links; not bit-identical.
    F16,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            Self::F32 => 4,
            Self::F16 => 2,
        }
    }

    fn tag(self) -> u8 {
        match self {
            Self::F32 => 0,
            Self::F16 => 1,
        }
    }

    fn from_tag(tag: u8) -> Result<Self, WireError> {
        match tag {
            0 => Ok(Self::F32),
            1 => Ok(Self::F16),
            _ => Err(WireError::Invalid("unknown tensor dtype")),
        }
    }
}

/// A `rows × cols` matrix of hidden states.
#[derive(Debug, Clone, PartialEq)]
pub struct Tensor {
    dtype: DType,
    rows: u32,
    cols: u32,
    data: Vec<u8>,
}

/// Widest hidden state accepted.
const MAX_COLS: u32 = 1 << 16;

impl Tensor {
    /// Encodes `values` (`rows × cols`, row-major) as `dtype`.
    pub fn from_f32(dtype: DType, rows: usize, cols: usize, values: &[f32]) -> Self {
        assert_eq!(values.len(), rows * cols, "tensor shape");
        let data = match dtype {
            DType::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            DType::F16 => values.iter().flat_map(|v| f16::from_f32(*v).to_le_bytes()).collect(),
        };
        Self { dtype, rows: rows as u32, cols: cols as u32, data }
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn rows(&self) -> usize {
        self.rows as usize
    }

    pub fn cols(&self) -> usize {
        self.cols as usize
    }

    /// The exact bytes (what commitments hash).
    pub fn bytes(&self) -> &[u8] {
        &self.data
    }

    pub fn to_f32(&self) -> Vec<f32> {
        match self.dtype {
            DType::F32 => self.data.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            DType::F16 => self.data.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        }
    }

    pub(crate) fn write(&self, w: &mut Writer) {
        w.u8(self.dtype.tag()).u32(self.rows).u32(self.cols).bytes(&self.data);
    }

    pub(crate) fn read(r: &mut Reader<'_>) -> Result<Self, WireError> {
        let dtype = DType::from_tag(r.u8()?)?;
        let (rows, cols) = (r.u32()?, r.u32()?);
        if cols == 0 || cols > MAX_COLS || rows == 0 {
            return Err(WireError::Invalid("tensor shape out of range"));
        }
        let expected = (rows as usize)
            .checked_mul(cols as usize)
            .and_then(|n| n.checked_mul(dtype.size()))
            .filter(|&n| n <= MAX_FRAME)
            .ok_or(WireError::TooLong { what: "tensor", len: usize::MAX, max: MAX_FRAME })?;
        let data = r.bytes(MAX_FRAME)?;
        if data.len() != expected {
            return Err(WireError::Invalid("tensor bytes do not match its shape"));
        }
        Ok(Self { dtype, rows, cols, data: data.to_vec() })
    }
}
