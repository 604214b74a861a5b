//! Lets gRPC C-core clients (Python's grpcio, C++, Ruby, PHP, C#) call us on the Unix socket.
//!
//! Dialing `unix:/run/rls.sock`, C-core sends the socket path, percent-encoded, as the HTTP/2
//! `:authority` (`%2Frun%2Frls.sock`). h2 parses `:authority` as a URI authority, where `%` is
//! not allowed, and resets the stream with PROTOCOL_ERROR: every call fails with INTERNAL
//! "Stream removed". grpc-go, the reference's server, accepts it. h2 has no switch for this, so
//! [`AuthorityFix`] rewrites what the client sends on Unix-socket connections, before h2 reads
//! it; TCP connections are not wrapped, and there h2's check stands.
//!
//! Frames other than HEADERS and CONTINUATION pass through as they arrive (DATA straight into
//! the reader's buffer). Each header block is reassembled and decoded with one HPACK decoder per
//! connection: the client's encoder indexes headers in its dynamic table, so every block must be
//! decoded, in order, to keep our copy of the table right. A `:authority` that is not a valid
//! authority becomes `localhost`, as grpc-go names unix targets. Every block is then re-encoded
//! with literals that never touch the dynamic table, so h2's decoder keeps no state that has to
//! match ours, and sent as HEADERS plus CONTINUATION frames of at most 16 KiB. A block too
//! large to hold or that does not decode fails the connection. What we write is not touched.

use std::{
    io,
    pin::Pin,
    task::{ready, Context, Poll},
};

use bytes::BytesMut;
use loona_hpack::decoder::DecoderError;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tonic::transport::server::Connected;

/// The client connection preface, `PRI * HTTP/2.0...`: passed through unread.
const PREFACE_LEN: usize = 24;
const FRAME_HEADER_LEN: usize = 9;

const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;

const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// Largest frame payload we send: the smallest `SETTINGS_MAX_FRAME_SIZE` HTTP/2 allows, and
/// the one our server advertises (hyper's default; tonic sets no other).
const MAX_FRAME: usize = 16_384;
/// Largest header block we hold, as received across its frames: four times the 16 KiB header
/// list hyper accepts, so h2 still answers the merely too large ones itself.
pub const MAX_BLOCK: usize = 64 * 1024;
/// Largest decoded header list (RFC 9113 sizes: name + value + 32 per field). Bounds what a
/// small block of references to large dynamic-table entries can make us allocate.
pub const MAX_LIST: usize = 64 * 1024;
/// The dynamic table size the client may use: our `SETTINGS_HEADER_TABLE_SIZE`, which the
/// server leaves at the default. h2 would reject a larger one; it never sees the client's
/// table size updates now, so we do.
const MAX_TABLE: usize = 4096;
/// The `:authority` given to a request whose own one h2 would reject.
const FALLBACK_AUTHORITY: &[u8] = b"localhost";

/// Why a connection's byte stream cannot be rewritten (the connection is then closed).
#[derive(Debug, thiserror::Error)]
pub enum RewriteError {
    #[error("HTTP/2 header block larger than {MAX_BLOCK} bytes")]
    BlockTooLarge,
    #[error("HTTP/2 header frame of {0} bytes, over the {MAX_FRAME} we advertise")]
    FrameTooLarge(usize),
    #[error("HTTP/2 header list larger than {MAX_LIST} bytes once decoded")]
    ListTooLarge,
    #[error("HTTP/2 HEADERS frame too short for its padding or priority fields")]
    BadHeadersFrame,
    #[error("HTTP/2 frame of type {0:#x} inside a header block, where only CONTINUATION may come")]
    ExpectedContinuation(u8),
    #[error("HTTP/2 CONTINUATION for stream {got} inside the header block of stream {open}")]
    WrongStream { open: u32, got: u32 },
    #[error("HPACK: {0}")]
    Hpack(#[from] DecoderError),
}

impl From<RewriteError> for io::Error {
    fn from(e: RewriteError) -> Self {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }
}

/// Where the rewriter is in the client's byte stream.
#[derive(Debug, Clone, Copy, PartialEq)]
enum State {
    /// This many bytes (of the preface or a frame payload) go through unchanged.
    Forward(usize),
    /// At the start of a frame.
    FrameHeader,
}

/// A header block whose CONTINUATION frames are still to come.
struct Block {
    stream: u32,
    /// The HEADERS frame's END_STREAM and PRIORITY flags.
    flags: u8,
    /// The HEADERS frame's priority fields, kept as they were.
    priority: Option<[u8; 5]>,
    fragment: Vec<u8>,
}

/// The rewriting, without IO: bytes in, bytes out.
struct Rewriter {
    state: State,
    /// One per connection, fed every block in order (see the module doc).
    decoder: loona_hpack::Decoder<'static>,
    block: Option<Block>,
}

impl Rewriter {
    fn new() -> Self {
        let mut decoder = loona_hpack::Decoder::new();
        decoder.set_max_allowed_table_size(MAX_TABLE);
        Self {
            state: State::Forward(PREFACE_LEN),
            decoder,
            block: None,
        }
    }

    /// Bytes that go through unchanged before the next frame header.
    fn forwarding(&self) -> usize {
        match self.state {
            State::Forward(n) => n,
            State::FrameHeader => 0,
        }
    }

    /// `n` bytes went through unchanged, read straight into the caller's buffer.
    fn forwarded(&mut self, n: usize) {
        if let State::Forward(left) = self.state {
            self.state = Self::forward(left.saturating_sub(n));
        }
    }

    fn forward(n: usize) -> State {
        if n == 0 {
            State::FrameHeader
        } else {
            State::Forward(n)
        }
    }

    /// Moves what it can from `input` to `out`. What stays in `input` is an incomplete frame
    /// header or an incomplete HEADERS or CONTINUATION frame.
    fn process(&mut self, input: &mut BytesMut, out: &mut BytesMut) -> Result<(), RewriteError> {
        loop {
            if let State::Forward(n) = self.state {
                let take = n.min(input.len());
                out.extend_from_slice(&input.split_to(take));
                self.state = Self::forward(n - take);
                if n > take {
                    return Ok(());
                }
                continue;
            }
            let [l0, l1, l2, kind, flags, s0, s1, s2, s3, ..] = input[..] else {
                return Ok(());
            };
            let len = usize::from(l0) << 16 | usize::from(l1) << 8 | usize::from(l2);
            let stream = u32::from_be_bytes([s0, s1, s2, s3]) & 0x7fff_ffff;
            let header_frame = kind == HEADERS || (kind == CONTINUATION && self.block.is_some());
            if !header_frame {
                if self.block.is_some() {
                    return Err(RewriteError::ExpectedContinuation(kind));
                }
                // Anything else, a stray CONTINUATION included, is h2's to judge.
                out.extend_from_slice(&input.split_to(FRAME_HEADER_LEN));
                self.state = Self::forward(len);
                continue;
            }
            if len > MAX_FRAME {
                // h2 would close the connection for it too (FRAME_SIZE_ERROR).
                return Err(RewriteError::FrameTooLarge(len));
            }
            if input.len() < FRAME_HEADER_LEN + len {
                return Ok(());
            }
            let frame = input.split_to(FRAME_HEADER_LEN + len);
            let payload = frame.get(FRAME_HEADER_LEN..).unwrap_or_default();
            if kind == HEADERS {
                self.open(flags, stream, payload)?;
            } else {
                self.append(stream, payload)?;
            }
            if flags & END_HEADERS != 0 {
                self.finish(out)?;
            }
        }
    }

    /// A HEADERS frame: its padding dropped, its priority fields kept.
    fn open(&mut self, flags: u8, stream: u32, payload: &[u8]) -> Result<(), RewriteError> {
        if self.block.is_some() {
            return Err(RewriteError::ExpectedContinuation(HEADERS));
        }
        let mut rest = payload;
        let mut pad = 0;
        if flags & PADDED != 0 {
            let (&p, r) = rest.split_first().ok_or(RewriteError::BadHeadersFrame)?;
            pad = usize::from(p);
            rest = r;
        }
        let mut priority = None;
        if flags & PRIORITY != 0 {
            let (p, r) = rest
                .split_first_chunk::<5>()
                .ok_or(RewriteError::BadHeadersFrame)?;
            priority = Some(*p);
            rest = r;
        }
        let fragment = rest
            .len()
            .checked_sub(pad)
            .and_then(|end| rest.get(..end))
            .ok_or(RewriteError::BadHeadersFrame)?;
        self.block = Some(Block {
            stream,
            flags: flags & (END_STREAM | PRIORITY),
            priority,
            fragment: fragment.to_vec(),
        });
        Ok(())
    }

    /// A CONTINUATION frame of the open block.
    fn append(&mut self, stream: u32, payload: &[u8]) -> Result<(), RewriteError> {
        let Some(block) = self.block.as_mut() else {
            return Ok(());
        };
        if block.stream != stream {
            return Err(RewriteError::WrongStream {
                open: block.stream,
                got: stream,
            });
        }
        if block.fragment.len() + payload.len() > MAX_BLOCK {
            return Err(RewriteError::BlockTooLarge);
        }
        block.fragment.extend_from_slice(payload);
        Ok(())
    }

    /// The block is complete: decode, fix `:authority`, re-encode, frame.
    fn finish(&mut self, out: &mut BytesMut) -> Result<(), RewriteError> {
        let Some(block) = self.block.take() else {
            return Ok(());
        };
        let mut fields = Vec::new();
        let mut size = 0usize;
        self.decoder
            .decode_with_cb(&block.fragment, |name, value| {
                size = size.saturating_add(name.len() + value.len() + 32);
                if size <= MAX_LIST {
                    fields.push((name.into_owned(), value.into_owned()));
                }
            })?;
        if size > MAX_LIST {
            return Err(RewriteError::ListTooLarge);
        }
        let mut encoded = Vec::with_capacity(size);
        for (name, value) in &fields {
            let value =
                if name == b":authority" && http::uri::Authority::try_from(&value[..]).is_err() {
                    FALLBACK_AUTHORITY
                } else {
                    value
                };
            encode_literal(name, value, &mut encoded);
        }
        write_block(&block, &encoded, out);
        Ok(())
    }
}

/// A field as "literal header field without indexing, new name" (RFC 7541 6.2.2), strings
/// not Huffman-coded: no dynamic table entry on either side.
fn encode_literal(name: &[u8], value: &[u8], out: &mut Vec<u8>) {
    out.push(0);
    for s in [name, value] {
        encode_integer(s.len(), 7, out);
        out.extend_from_slice(s);
    }
}

/// An HPACK integer with a `prefix_bits` prefix in a fresh first byte (RFC 7541 5.1).
fn encode_integer(mut value: usize, prefix_bits: u8, out: &mut Vec<u8>) {
    let max = (1usize << prefix_bits) - 1;
    if value < max {
        out.push(value as u8);
        return;
    }
    out.push(max as u8);
    value -= max;
    while value >= 0x80 {
        out.push((value & 0x7f) as u8 | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

/// `encoded` as a HEADERS frame with the block's flags and priority, then CONTINUATION frames
/// as needed; END_HEADERS on the last.
fn write_block(block: &Block, encoded: &[u8], out: &mut BytesMut) {
    let priority: &[u8] = block.priority.as_ref().map_or(&[], |p| p.as_slice());
    let (first, mut rest) = encoded.split_at(encoded.len().min(MAX_FRAME - priority.len()));
    let last = |rest: &[u8]| if rest.is_empty() { END_HEADERS } else { 0 };
    let len = priority.len() + first.len();
    write_frame_header(len, HEADERS, block.flags | last(rest), block.stream, out);
    out.extend_from_slice(priority);
    out.extend_from_slice(first);
    while !rest.is_empty() {
        let (chunk, after) = rest.split_at(rest.len().min(MAX_FRAME));
        rest = after;
        write_frame_header(chunk.len(), CONTINUATION, last(rest), block.stream, out);
        out.extend_from_slice(chunk);
    }
}

fn write_frame_header(len: usize, kind: u8, flags: u8, stream: u32, out: &mut BytesMut) {
    let len = (len as u32).to_be_bytes();
    out.extend_from_slice(&[len[1], len[2], len[3], kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
}

/// A Unix-socket connection whose client header blocks are rewritten (see the module doc).
pub struct AuthorityFix<T> {
    inner: T,
    rewriter: Rewriter,
    /// Read from `inner`, not yet rewritten: at most one frame header or header frame.
    input: BytesMut,
    /// Rewritten, not yet read by the caller.
    out: BytesMut,
}

/// How much is read from the peer at once while frames are being taken apart.
const READ_CHUNK: usize = 8192;

impl<T> AuthorityFix<T> {
    pub fn new(inner: T) -> Self {
        Self {
            inner,
            rewriter: Rewriter::new(),
            input: BytesMut::new(),
            out: BytesMut::new(),
        }
    }

    /// The wrapped connection, for a connection nothing has been read from yet (anything read
    /// and not yet handed on would be lost).
    pub fn into_inner(self) -> T {
        self.inner
    }

    /// The wrapped connection.
    pub fn get_ref(&self) -> &T {
        &self.inner
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for AuthorityFix<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Every pass returns or reads from `inner`, so Pending always comes with a waker set.
        loop {
            if !this.out.is_empty() || buf.remaining() == 0 {
                let n = this.out.len().min(buf.remaining());
                buf.put_slice(&this.out.split_to(n));
                return Poll::Ready(Ok(()));
            }
            let forward = this.rewriter.forwarding();
            if forward > 0 && this.input.is_empty() {
                // A payload that goes through unchanged: straight into the caller's buffer.
                let dst = buf.initialize_unfilled_to(forward.min(buf.remaining()));
                let mut direct = ReadBuf::new(dst);
                ready!(Pin::new(&mut this.inner).poll_read(cx, &mut direct))?;
                let n = direct.filled().len();
                buf.advance(n);
                this.rewriter.forwarded(n);
                return Poll::Ready(Ok(()));
            }
            let mut chunk = [0u8; READ_CHUNK];
            let mut chunk = ReadBuf::new(&mut chunk);
            ready!(Pin::new(&mut this.inner).poll_read(cx, &mut chunk))?;
            if chunk.filled().is_empty() {
                // End of stream; a partial frame held here is dropped, and h2 sees the close.
                return Poll::Ready(Ok(()));
            }
            this.input.extend_from_slice(chunk.filled());
            this.rewriter.process(&mut this.input, &mut this.out)?;
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for AuthorityFix<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

impl<T: Connected> Connected for AuthorityFix<T> {
    type ConnectInfo = T::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use tokio::io::AsyncReadExt;

    const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    const PERCENT: &str = "tmp%2Frun%2Frls.sock";

    /// Yields its bytes `step` at a time, so frames arrive split at every boundary.
    struct Trickle {
        data: Vec<u8>,
        pos: usize,
        step: usize,
    }

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            _: &mut Context<'_>,
            buf: &mut ReadBuf<'_>,
        ) -> Poll<io::Result<()>> {
            let end = (self.pos.saturating_add(self.step))
                .min(self.data.len())
                .min(self.pos + buf.remaining());
            buf.put_slice(&self.data[self.pos..end]);
            self.pos = end;
            Poll::Ready(Ok(()))
        }
    }

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let mut out = BytesMut::new();
        write_frame_header(payload.len(), kind, flags, stream, &mut out);
        out.extend_from_slice(payload);
        out.to_vec()
    }

    fn connection(frames: &[Vec<u8>]) -> Vec<u8> {
        let mut data = PREFACE.to_vec();
        frames.iter().for_each(|f| data.extend_from_slice(f));
        data
    }

    /// `input` through the rewriter, fed `step` bytes at a time and read `read` bytes at a time.
    async fn rewrite(input: &[u8], step: usize, read: usize) -> io::Result<Vec<u8>> {
        let mut fix = AuthorityFix::new(Trickle {
            data: input.to_vec(),
            pos: 0,
            step,
        });
        let mut out = Vec::new();
        let mut buf = vec![0u8; read];
        loop {
            let n = fix.read(&mut buf).await?;
            if n == 0 {
                return Ok(out);
            }
            out.extend_from_slice(&buf[..n]);
        }
    }

    /// The same output whatever the input and read splits; checked at a few.
    async fn rewrite_all_ways(input: &[u8]) -> io::Result<Vec<u8>> {
        let whole = rewrite(input, usize::MAX, 1 << 20).await?;
        for (step, read) in [(1, 1 << 20), (1, 1), (7, 3), (4096, 10)] {
            assert_eq!(
                rewrite(input, step, read).await?,
                whole,
                "step {step} read {read}"
            );
        }
        Ok(whole)
    }

    /// (type, flags, stream, payload) of each frame after the preface.
    fn frames(out: &[u8]) -> Vec<(u8, u8, u32, Vec<u8>)> {
        assert_eq!(&out[..24], PREFACE, "preface passed through");
        let mut rest = &out[24..];
        let mut frames = Vec::new();
        while !rest.is_empty() {
            let len = usize::from(rest[0]) << 16 | usize::from(rest[1]) << 8 | usize::from(rest[2]);
            let stream = u32::from_be_bytes([rest[5], rest[6], rest[7], rest[8]]);
            frames.push((rest[3], rest[4], stream, rest[9..9 + len].to_vec()));
            rest = &rest[9 + len..];
        }
        frames
    }

    type Fields = Vec<(String, String)>;

    /// Each header block in the output, decoded with a fresh decoder: the output must not
    /// depend on any dynamic table.
    fn blocks(out: &[u8]) -> Vec<Fields> {
        let mut blocks = Vec::new();
        let mut open: Option<Vec<u8>> = None;
        for (kind, flags, _, payload) in frames(out) {
            match kind {
                HEADERS => {
                    assert!(open.is_none());
                    assert_eq!(flags & PADDED, 0, "padding dropped");
                    let skip = if flags & PRIORITY != 0 { 5 } else { 0 };
                    open = Some(payload[skip..].to_vec());
                }
                CONTINUATION => open.as_mut().unwrap().extend_from_slice(&payload),
                _ => continue,
            }
            if flags & END_HEADERS != 0 {
                let block = open.take().unwrap();
                let fields = loona_hpack::Decoder::new().decode(&block).unwrap();
                blocks.push(
                    fields
                        .into_iter()
                        .map(|(n, v)| {
                            (String::from_utf8(n).unwrap(), String::from_utf8(v).unwrap())
                        })
                        .collect(),
                );
            }
        }
        assert!(open.is_none(), "a block left open");
        blocks
    }

    fn request(authority: &str) -> Fields {
        [
            (":method", "POST"),
            (":scheme", "http"),
            (
                ":path",
                "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit",
            ),
            (":authority", authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
            (
                "user-agent",
                "grpc-python/1.85.1 grpc-c/50.0.0 (linux; chttp2)",
            ),
        ]
        .iter()
        .map(|(n, v)| (n.to_string(), v.to_string()))
        .collect()
    }

    /// Encoded as a client would, indexing into its dynamic table.
    fn encode(encoder: &mut loona_hpack::Encoder<'_>, fields: &Fields) -> Vec<u8> {
        encoder.encode(fields.iter().map(|(n, v)| (n.as_bytes(), v.as_bytes())))
    }

    fn with_authority(mut fields: Fields, authority: &str) -> Fields {
        for (n, v) in &mut fields {
            if n == ":authority" {
                *v = authority.to_owned();
            }
        }
        fields
    }

    #[tokio::test]
    async fn a_percent_encoded_authority_becomes_localhost_and_other_frames_pass_as_sent() {
        let mut enc = loona_hpack::Encoder::new();
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let block = encode(&mut enc, &request(PERCENT));
        let headers = frame(HEADERS, END_HEADERS, 1, &block);
        let data = frame(0x0, END_STREAM, 1, &[0x5a; 40_000]);
        let out = rewrite_all_ways(&connection(&[settings.clone(), headers, data.clone()]))
            .await
            .unwrap();
        assert_eq!(
            blocks(&out),
            [with_authority(request(PERCENT), "localhost")]
        );
        let frames = frames(&out);
        assert_eq!(frames[0], (0x4, 0, 0, settings[9..].to_vec()));
        assert_eq!(
            (frames[1].0, frames[1].1, frames[1].2),
            (HEADERS, END_HEADERS, 1)
        );
        assert_eq!(frames[2], (0x0, END_STREAM, 1, data[9..].to_vec()));
    }

    #[tokio::test]
    async fn valid_authorities_are_kept() {
        for authority in [
            "localhost",
            "uds.invalid",
            "127.0.0.1:8081",
            "[::1]:8081",
            "rls",
        ] {
            let block = encode(&mut loona_hpack::Encoder::new(), &request(authority));
            let out = rewrite_all_ways(&connection(&[frame(HEADERS, END_HEADERS, 1, &block)]))
                .await
                .unwrap();
            assert_eq!(blocks(&out), [request(authority)], "{authority}");
        }
        // No :authority at all: nothing added.
        let fields: Fields = request("x")
            .into_iter()
            .filter(|(n, _)| n != ":authority")
            .collect();
        let block = encode(&mut loona_hpack::Encoder::new(), &fields);
        let out = rewrite(&connection(&[frame(HEADERS, END_HEADERS, 1, &block)]), 1, 1)
            .await
            .unwrap();
        assert_eq!(blocks(&out), [fields]);
    }

    #[tokio::test]
    async fn dynamic_table_references_across_blocks_decode_in_order() {
        // As C-core sends them: the 1st block adds the :authority to the dynamic table (index
        // 62), the 2nd refers to it in one byte, the 3rd adds x-request-id first, which moves
        // the :authority to 63.
        let path = "/envoy.service.ratelimit.v3.RateLimitService/ShouldRateLimit";
        let string = |s: &str| {
            let mut b = Vec::new();
            encode_integer(s.len(), 7, &mut b);
            b.extend_from_slice(s.as_bytes());
            b
        };
        let literal = |first: u8, s: &str| [vec![first], string(s)].concat();
        let base = [vec![0x83, 0x86], literal(0x04, path)].concat();
        let b1 = [base.clone(), literal(0x41, PERCENT)].concat();
        let b2 = [base.clone(), vec![0x80 | 62]].concat();
        let b3 = [
            base,
            literal(0x40, "x-request-id"),
            string("3"),
            vec![0x80 | 63],
        ]
        .concat();
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &b1),
            frame(HEADERS, END_HEADERS | END_STREAM, 3, &b2),
            frame(HEADERS, END_HEADERS, 5, &b3),
        ]);
        let out = rewrite_all_ways(&input).await.unwrap();
        let fields = |extra: &[(&str, &str)]| -> Fields {
            [(":method", "POST"), (":scheme", "http"), (":path", path)]
                .iter()
                .chain(extra)
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let authority = (":authority", "localhost");
        assert_eq!(
            blocks(&out),
            [
                fields(&[authority]),
                fields(&[authority]),
                fields(&[("x-request-id", "3"), authority]),
            ]
        );
        let flags: Vec<(u8, u32)> = frames(&out).iter().map(|f| (f.1, f.2)).collect();
        assert_eq!(
            flags,
            [
                (END_HEADERS, 1),
                (END_HEADERS | END_STREAM, 3),
                (END_HEADERS, 5)
            ]
        );

        // The same through an encoder indexing every new name (user-agent, te, ...).
        let mut enc = loona_hpack::Encoder::new();
        let blocks_in: Vec<Vec<u8>> = (0..3)
            .map(|i| {
                frame(
                    HEADERS,
                    END_HEADERS,
                    2 * i + 1,
                    &encode(&mut enc, &request(PERCENT)),
                )
            })
            .collect();
        let out = rewrite_all_ways(&connection(&blocks_in)).await.unwrap();
        let fixed = with_authority(request(PERCENT), "localhost");
        assert_eq!(blocks(&out), [fixed.clone(), fixed.clone(), fixed]);
    }

    #[tokio::test]
    async fn huffman_coded_blocks_with_dynamic_table_entries_decode() {
        // RFC 7541 C.4: three requests, Huffman-coded, the later ones indexing the earlier.
        let hex = [
            "828684418cf1e3c2e5f23a6ba0ab90f4ff",
            "828684be5886a8eb10649cbf",
            "828785bf408825a849e95ba97d7f8925a849e95bb8e8b4bf",
        ];
        let frames_in: Vec<Vec<u8>> = hex
            .iter()
            .enumerate()
            .map(|(i, h)| {
                let block: Vec<u8> = (0..h.len())
                    .step_by(2)
                    .map(|j| u8::from_str_radix(&h[j..j + 2], 16).unwrap())
                    .collect();
                frame(HEADERS, END_HEADERS, 2 * i as u32 + 1, &block)
            })
            .collect();
        let out = rewrite_all_ways(&connection(&frames_in)).await.unwrap();
        let pairs = |v: &[(&str, &str)]| -> Fields {
            v.iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect()
        };
        let base = [(":method", "GET"), (":scheme", "http"), (":path", "/")];
        let auth = (":authority", "www.example.com");
        assert_eq!(
            blocks(&out),
            [
                pairs(&[base[0], base[1], base[2], auth]),
                pairs(&[
                    base[0],
                    base[1],
                    base[2],
                    auth,
                    ("cache-control", "no-cache")
                ]),
                pairs(&[
                    base[0],
                    (":scheme", "https"),
                    (":path", "/index.html"),
                    auth,
                    ("custom-key", "custom-value"),
                ]),
            ]
        );
    }

    #[tokio::test]
    async fn a_block_across_continuation_frames_is_reassembled() {
        let block = encode(&mut loona_hpack::Encoder::new(), &request(PERCENT));
        let (a, rest) = block.split_at(5);
        let (b, c) = rest.split_at(20);
        let input = connection(&[
            frame(HEADERS, END_STREAM, 7, a),
            frame(CONTINUATION, 0, 7, b),
            frame(CONTINUATION, END_HEADERS, 7, c),
            frame(0x8, 0, 0, &[0, 0, 1, 0]),
        ]);
        let out = rewrite_all_ways(&input).await.unwrap();
        assert_eq!(
            blocks(&out),
            [with_authority(request(PERCENT), "localhost")]
        );
        let frames = frames(&out);
        assert_eq!(
            frames.len(),
            2,
            "one HEADERS (the block is small), then WINDOW_UPDATE"
        );
        assert_eq!(
            (frames[0].0, frames[0].1, frames[0].2),
            (HEADERS, END_STREAM | END_HEADERS, 7)
        );
        assert_eq!(frames[1], (0x8, 0, 0, vec![0, 0, 1, 0]));
    }

    #[tokio::test]
    async fn padding_is_dropped_and_priority_kept() {
        let block = encode(&mut loona_hpack::Encoder::new(), &request(PERCENT));
        let priority = [0x80, 0, 0, 3, 200];
        let mut payload = vec![9];
        payload.extend_from_slice(&priority);
        payload.extend_from_slice(&block);
        payload.extend_from_slice(&[0; 9]);
        let flags = END_HEADERS | END_STREAM | PADDED | PRIORITY;
        let out = rewrite_all_ways(&connection(&[frame(HEADERS, flags, 1, &payload)]))
            .await
            .unwrap();
        assert_eq!(
            blocks(&out),
            [with_authority(request(PERCENT), "localhost")]
        );
        let frames = frames(&out);
        assert_eq!(frames[0].1, END_HEADERS | END_STREAM | PRIORITY);
        assert_eq!(frames[0].3[..5], priority);
    }

    /// A first block adding a 3000-byte field to the client's dynamic table, then a block of
    /// `refs` one-byte references to it.
    fn big_references(refs: usize) -> Vec<u8> {
        let mut enc = loona_hpack::Encoder::new();
        let mut fields = request("localhost");
        fields.push(("x-big".into(), "b".repeat(3000)));
        let b1 = encode(&mut enc, &fields);
        // x-big is the newest entry: index 62.
        let b2: Vec<u8> = std::iter::repeat_n(0x80 | 62, refs).collect();
        connection(&[
            frame(HEADERS, END_HEADERS, 1, &b1),
            frame(HEADERS, END_HEADERS, 3, &b2),
        ])
    }

    #[tokio::test]
    async fn a_block_larger_than_a_frame_is_split_into_continuation_frames() {
        // 10 bytes of references become 10 fields of 3000 bytes.
        let out = rewrite_all_ways(&big_references(10)).await.unwrap();
        let frames = frames(&out);
        let kinds: Vec<(u8, u8, u32)> = frames.iter().map(|f| (f.0, f.1, f.2)).collect();
        assert_eq!(
            kinds,
            [
                (HEADERS, END_HEADERS, 1),
                (HEADERS, 0, 3),
                (CONTINUATION, END_HEADERS, 3)
            ]
        );
        assert!(frames.iter().all(|f| f.3.len() <= MAX_FRAME));
        let blocks = blocks(&out);
        let big = ("x-big".to_string(), "b".repeat(3000));
        assert_eq!(blocks[1], vec![big; 10]);
    }

    async fn rewrite_error(input: &[u8]) -> String {
        for step in [1, usize::MAX] {
            let e = rewrite(input, step, 1 << 20).await.unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        }
        rewrite(input, 1, 1).await.unwrap_err().to_string()
    }

    #[tokio::test]
    async fn too_large_or_malformed_input_fails_the_connection() {
        let block = encode(&mut loona_hpack::Encoder::new(), &request(PERCENT));
        // A block growing past MAX_BLOCK over CONTINUATION frames.
        let mut over = vec![frame(HEADERS, 0, 1, &block)];
        over.extend((0..4).map(|_| frame(CONTINUATION, 0, 1, &[0; MAX_FRAME])));
        assert_eq!(
            rewrite_error(&connection(&over)).await,
            RewriteError::BlockTooLarge.to_string()
        );
        // One header frame over the frame size we advertise.
        let big = frame(HEADERS, END_HEADERS, 1, &[0; MAX_FRAME + 1]);
        assert!(rewrite_error(&connection(&[big]))
            .await
            .contains("header frame of 16385 bytes"));
        // A small block decoding to a header list past MAX_LIST.
        assert_eq!(
            rewrite_error(&big_references(30)).await,
            RewriteError::ListTooLarge.to_string()
        );
        // An index into an empty dynamic table; a truncated string; a table size update over
        // what the server allows.
        for garbage in [
            &[0x80 | 70][..],
            &[0x00, 0x05, b'a'],
            &[0x3f, 0xe2, 0x1f, 0x82],
        ] {
            let input = connection(&[frame(HEADERS, END_HEADERS, 1, garbage)]);
            assert!(
                rewrite_error(&input).await.starts_with("HPACK: "),
                "{garbage:?}"
            );
        }
        // Padding longer than the payload.
        let input = connection(&[frame(HEADERS, END_HEADERS | PADDED, 1, &[10, 0x82])]);
        assert_eq!(
            rewrite_error(&input).await,
            RewriteError::BadHeadersFrame.to_string()
        );
        // Another frame where a CONTINUATION must come, or a CONTINUATION of another stream.
        let open = frame(HEADERS, 0, 1, &block);
        let data = frame(0x0, 0, 1, b"x");
        let input = connection(&[open.clone(), data]);
        assert_eq!(
            rewrite_error(&input).await,
            RewriteError::ExpectedContinuation(0).to_string()
        );
        let input = connection(&[open, frame(CONTINUATION, END_HEADERS, 3, &[0x82])]);
        assert_eq!(
            rewrite_error(&input).await,
            RewriteError::WrongStream { open: 1, got: 3 }.to_string()
        );
    }

    #[tokio::test]
    async fn a_table_size_update_within_the_limit_is_honoured() {
        // 0x20: size 0, evicting the entries the first block added; the second block's
        // reference to index 62 is then an error, as it would be at the client.
        let mut enc = loona_hpack::Encoder::new();
        let b1 = encode(&mut enc, &request(PERCENT));
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &b1),
            frame(HEADERS, END_HEADERS, 3, &[0x20, 0x80 | 62]),
        ]);
        assert!(rewrite_error(&input).await.starts_with("HPACK: "));
        let input = connection(&[
            frame(HEADERS, END_HEADERS, 1, &b1),
            frame(HEADERS, END_HEADERS, 3, &[0x20, 0x82]),
        ]);
        let out = rewrite(&input, 1, 1).await.unwrap();
        assert_eq!(
            blocks(&out)[1],
            [(":method".to_string(), "GET".to_string())]
        );
    }

    #[test]
    fn integers_encode_as_rfc_7541_c_1() {
        let enc = |v, bits| {
            let mut out = Vec::new();
            encode_integer(v, bits, &mut out);
            out
        };
        assert_eq!(enc(10, 5), [10]);
        assert_eq!(enc(1337, 5), [31, 154, 10]);
        assert_eq!(enc(42, 8), [42]);
        assert_eq!(enc(127, 7), [127, 0]);
    }
}
