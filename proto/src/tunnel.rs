//! A tunnel's byte stream as `AsyncRead + AsyncWrite`: incoming
//! [`TunnelFrame`]s are read as bytes, written bytes go out as frames. Both
//! ends of a tunnel use it (gractl's SSH client, grad-runner's SSH server), so
//! SSH runs over it as over a TCP socket.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    sync::mpsc,
};
use tokio_stream::Stream;
use tokio_util::sync::PollSender;

use crate::v1::TunnelFrame;

/// The largest frame a write produces; bigger writes are split. A whole
/// 256 KiB HTTP/2 frame (the size grad, grad-runner and gractl agree on)
/// less the gRPC and protobuf headers, so an SSH packet of up to 64 KiB and
/// most runs of them travel as one frame.
pub const MAX_FRAME: usize = 256 * 1024 - 64;

/// How grad-runner dials grad, and one grad replica another, for streams
/// that carry tunnels: no Nagle, keep-alives, and HTTP/2 windows and frames
/// sized for bulk SSH traffic (as grad's server and gractl use them).
pub fn tunnel_endpoint(endpoint: tonic::transport::Endpoint) -> tonic::transport::Endpoint {
    endpoint
        .tcp_nodelay(true)
        .connect_timeout(std::time::Duration::from_secs(2))
        .http2_keep_alive_interval(std::time::Duration::from_secs(10))
        .keep_alive_timeout(std::time::Duration::from_secs(10))
        .initial_stream_window_size(4 << 20)
        .initial_connection_window_size(8 << 20)
        .max_frame_size(256 << 10)
}

pub struct TunnelIo<S> {
    inbound: S,
    /// What is left of the last frame read.
    pending: Bytes,
    outbound: PollSender<TunnelFrame>,
}

impl<S> TunnelIo<S>
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Unpin,
{
    /// Reads from `inbound`; writes frames to `outbound` (the sending half
    /// of the request or response stream of the same tunnel).
    pub fn new(inbound: S, outbound: mpsc::Sender<TunnelFrame>) -> Self {
        TunnelIo {
            inbound,
            pending: Bytes::new(),
            outbound: PollSender::new(outbound),
        }
    }
}

fn broken(what: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::BrokenPipe, format!("tunnel: {what}"))
}

impl<S> AsyncRead for TunnelIo<S>
where
    S: Stream<Item = Result<TunnelFrame, tonic::Status>> + Unpin,
{
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.inbound).poll_next(cx)) {
                Some(Ok(frame)) => this.pending = frame.data,
                Some(Err(status)) => return Poll::Ready(Err(broken(status.message()))),
                // End of stream: EOF.
                None => return Poll::Ready(Ok(())),
            }
        }
        let n = buf.remaining().min(this.pending.len());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S> AsyncWrite for TunnelIo<S>
where
    S: Unpin,
{
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let outbound = &mut self.outbound;
        ready!(outbound.poll_reserve(cx)).map_err(|_| broken("closed"))?;
        let n = buf.len().min(MAX_FRAME);
        let frame = TunnelFrame {
            data: Bytes::copy_from_slice(&buf[..n]),
            ..Default::default()
        };
        outbound.send_item(frame).map_err(|_| broken("closed"))?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Frames are handed to gRPC as they are written.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.outbound.close();
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_stream::wrappers::ReceiverStream;

    use super::*;

    #[tokio::test]
    async fn bytes_written_on_one_end_are_read_on_the_other() {
        // Two tunnels' worth of channels, crossed over like a socket pair.
        let (a_out, b_in) = mpsc::channel::<TunnelFrame>(4);
        let (b_out, a_in) = mpsc::channel::<TunnelFrame>(4);
        let ok = |rx| tokio_stream::StreamExt::map(ReceiverStream::new(rx), Ok);
        let mut a = TunnelIo::new(ok(a_in), a_out);
        let mut b = TunnelIo::new(ok(b_in), b_out);

        let big: Vec<u8> = (0..300_000u32).map(|i| i as u8).collect();
        let expected = big.clone();
        let writer = tokio::spawn(async move {
            a.write_all(&big).await.unwrap();
            a.shutdown().await.unwrap();
            let mut reply = String::new();
            a.read_to_string(&mut reply).await.unwrap();
            reply
        });
        let mut got = Vec::new();
        b.read_to_end(&mut got).await.unwrap();
        assert_eq!(got, expected);
        b.write_all(b"done").await.unwrap();
        b.shutdown().await.unwrap();
        drop(b);
        assert_eq!(writer.await.unwrap(), "done");
    }
}
