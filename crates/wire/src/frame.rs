//! Length-prefixed frames over async byte streams.

use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::{MAX_FRAME, WireError};

/// Reads one frame. `Ok(None)` means the peer closed the stream cleanly
/// between frames. The length is checked against `max` before allocating.
pub async fn read_frame<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<Vec<u8>>, WireError> {
    match read_frame_len(reader, max).await? {
        None => Ok(None),
        Some(len) => read_payload(reader, len).await.map(Some),
    }
}

/// Reads a frame's length prefix (checked against `max`); `None` when the
/// peer closed the stream cleanly between frames. The payload follows
/// ([`read_payload`]), so that a reader can reserve memory for it first.
pub async fn read_frame_len<R: AsyncRead + Unpin>(reader: &mut R, max: usize) -> Result<Option<usize>, WireError> {
    let mut len = [0u8; 4];
    let mut got = 0;
    while got < 4 {
        let n = reader.read(&mut len[got..]).await?;
        if n == 0 {
            return if got == 0 { Ok(None) } else { Err(WireError::Truncated { needed: 4 - got, left: 0 }) };
        }
        got += n;
    }
    let len = u32::from_le_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(WireError::TooLong { what: "frame", len, max: max.min(MAX_FRAME) });
    }
    Ok(Some(len))
}

/// Reads a frame's payload of `len` bytes (after [`read_frame_len`]).
pub async fn read_payload<R: AsyncRead + Unpin>(reader: &mut R, len: usize) -> Result<Vec<u8>, WireError> {
    let mut payload = vec![0u8; len];
    reader.read_exact(&mut payload).await.map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => WireError::Truncated { needed: len, left: 0 },
        _ => WireError::Io(e),
    })?;
    Ok(payload)
}

/// Writes one frame and flushes it.
pub async fn write_frame<W: AsyncWrite + Unpin>(writer: &mut W, payload: &[u8]) -> Result<(), WireError> {
    if payload.len() > MAX_FRAME {
        return Err(WireError::TooLong { what: "frame", len: payload.len(), max: MAX_FRAME });
    }
    writer.write_all(&(payload.len() as u32).to_le_bytes()).await?;
    writer.write_all(payload).await?;
    writer.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_limits_hold() {
        futures::executor::block_on(async {
            let mut buf = Vec::new();
            write_frame(&mut buf, b"hello").await.expect("writes");
            write_frame(&mut buf, b"").await.expect("writes");
            let mut r = futures::io::Cursor::new(buf.clone());
            assert_eq!(read_frame(&mut r, 100).await.expect("reads"), Some(b"hello".to_vec()));
            assert_eq!(read_frame(&mut r, 100).await.expect("reads"), Some(Vec::new()));
            assert_eq!(read_frame(&mut r, 100).await.expect("clean end"), None);
            // A frame over the limit is refused before anything is allocated.
            let mut r = futures::io::Cursor::new(u32::MAX.to_le_bytes().to_vec());
            assert!(matches!(read_frame(&mut r, 100).await, Err(WireError::TooLong { .. })));
            // A frame cut short is an error, not a hang or a panic.
            let mut r = futures::io::Cursor::new(buf[..7].to_vec());
            assert!(matches!(read_frame(&mut r, 100).await, Err(WireError::Truncated { .. })));
            let mut r = futures::io::Cursor::new(vec![5, 0]);
            assert!(matches!(read_frame(&mut r, 100).await, Err(WireError::Truncated { .. })));
        });
    }
}
