//! A device's TLS connection on rustls's unbuffered API, holding no buffer while idle.
//!
//! rustls's buffered `ServerConnection` (what `tokio-rustls` wraps) keeps a 4 KiB
//! record buffer for every connection from its first read to its last, and most
//! devices are idle most of the time: with 1,000 devices that was 4 MiB of a gateway's
//! 32. [`TlsServerStream`] drives an `UnbufferedServerConnection` over a tokio
//! [`TcpStream`] itself. Its ciphertext, plaintext and outgoing buffers grow while data
//! flows and are given back once they are empty and the connection waits, so an idle
//! connection holds only rustls's connection state. Records are decrypted in place and
//! copied once, straight into the reader's buffer; only what does not fit there waits
//! in the plaintext buffer for the next read.
//!
//! Behaviour matches `tokio-rustls`: [`TlsServerStream::accept`] returns once the
//! handshake is complete (client certificate verified); a peer that closes TCP without
//! `close_notify` makes reads fail with `UnexpectedEof`; shutdown sends `close_notify`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use rustls::server::UnbufferedServerConnection;
use rustls::unbuffered::{ConnectionState, EncodeError, EncryptError, InsufficientSizeError};
use rustls::{ServerConfig, pki_types::CertificateDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// Bytes asked of the socket per read, at least: rustls's own read size.
const READ_SIZE: usize = 4096;
/// Application data encrypted per write call: four full TLS records.
const WRITE_SIZE: usize = 4 * 16384;
/// Encrypted bytes waiting for the socket above which writes wait for it first.
const OUTGOING_LIMIT: usize = 64 * 1024;
/// TLS record header: type, version, length.
const RECORD_HEADER: usize = 5;

/// A server-side TLS 1.3 connection over TCP; see the module documentation.
pub struct TlsServerStream {
    tcp: TcpStream,
    conn: UnbufferedServerConnection,
    /// Ciphertext read and not yet processed (at most one partial record after
    /// processing).
    incoming: Incoming,
    /// Decrypted application data from `plain_at` on is not yet read.
    plaintext: Vec<u8>,
    plain_at: usize,
    /// Encrypted records from `out_at` on are not yet written to the socket.
    outgoing: Vec<u8>,
    out_at: usize,
    /// The peer sent `close_notify`: reads return end of file.
    peer_closed: bool,
    /// We queued our `close_notify`.
    close_sent: bool,
    /// rustls reported an error: the connection is dead, and rustls is not called again
    /// (processing more input would queue a second fatal alert).
    failed: bool,
}

/// Where the connection stands after processing what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    /// The handshake needs more from the peer.
    Handshaking,
    /// Application data may flow (there may be more to read later).
    Open,
    /// Both sides sent `close_notify`.
    Closed,
}

/// What to encrypt once the connection may send application data.
enum Encrypt<'a> {
    Data(&'a [u8]),
    CloseNotify,
}

impl TlsServerStream {
    /// Runs the server handshake on `tcp` with `config` until the client's Finished
    /// (and certificate, if the configuration requires one) has been verified.
    ///
    /// # Errors
    /// The socket's errors, `InvalidData` with rustls's error (after its alert is sent,
    /// as far as the socket takes it), `UnexpectedEof` if the peer left mid-handshake.
    pub async fn accept(config: Arc<ServerConfig>, tcp: TcpStream) -> io::Result<Self> {
        let conn = UnbufferedServerConnection::new(config).map_err(invalid_data)?;
        let mut stream = Self {
            tcp,
            conn,
            incoming: Incoming::default(),
            plaintext: Vec::new(),
            plain_at: 0,
            outgoing: Vec::new(),
            out_at: 0,
            peer_closed: false,
            close_sent: false,
            failed: false,
        };
        std::future::poll_fn(|cx| stream.poll_handshake(cx)).await?;
        Ok(stream)
    }

    /// The client's certificate chain, end entity first, as verified in the handshake.
    pub fn peer_certificates(&self) -> Option<&[CertificateDer<'static>]> {
        self.conn.peer_certificates()
    }

    /// Bytes of buffer room the stream holds now (ciphertext, plaintext, outgoing):
    /// zero for a connection waiting with nothing in flight.
    pub fn buffer_capacity(&self) -> usize {
        self.incoming.buf.capacity() + self.plaintext.capacity() + self.outgoing.capacity()
    }

    fn poll_handshake(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        loop {
            let step = match self.process(None, None) {
                Ok((step, _)) => step,
                Err(err) => {
                    // Best effort: the alert rustls queued goes out if the socket takes it.
                    let _ = self.poll_write_out(cx);
                    return Poll::Ready(Err(err));
                }
            };
            ready!(self.poll_write_out(cx))?;
            match step {
                Step::Open if !self.conn.is_handshaking() => return Poll::Ready(Ok(())),
                Step::Closed => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Step::Open | Step::Handshaking => {
                    if ready!(self.poll_fill(cx))? == 0 {
                        return Poll::Ready(Err(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "tls handshake eof",
                        )));
                    }
                }
            }
        }
    }

    /// Processes the ciphertext read so far until the connection needs more input or
    /// is idle: decrypted data goes straight into `read_into` as far as it has room,
    /// the rest to `plaintext`; records to send go to `outgoing`. Once application data
    /// may be sent, encrypts `send` into `outgoing`; the flag says whether that
    /// happened. After an error, every call fails, and `outgoing` holds the alert rustls
    /// chose, for the caller to send if the socket takes it.
    fn process(
        &mut self,
        send: Option<Encrypt<'_>>,
        read_into: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Step, bool)> {
        if self.failed {
            return Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the TLS connection failed earlier",
            ));
        }
        let processed = self.process_records(send, read_into);
        if processed.is_err() {
            self.failed = true;
            self.encode_alert();
            self.incoming = Incoming::default();
        }
        processed
    }

    /// After an error: encodes what rustls queued (its fatal alert). Only while it has
    /// something queued: processing input again would queue a second alert.
    fn encode_alert(&mut self) {
        while self.conn.wants_write() {
            let status = self.conn.process_tls_records(self.incoming.unprocessed());
            let Ok(ConnectionState::EncodeTlsData(mut encode)) = status.state else {
                return;
            };
            let encoded = append(&mut self.outgoing, 64, |buf| {
                encode.encode(buf).map_err(encode_room)
            });
            if encoded.is_err() {
                return;
            }
        }
    }

    fn process_records(
        &mut self,
        mut send: Option<Encrypt<'_>>,
        mut read_into: Option<&mut ReadBuf<'_>>,
    ) -> io::Result<(Step, bool)> {
        loop {
            let status = self.conn.process_tls_records(self.incoming.unprocessed());
            let discard = status.discard;
            let state = match status.state {
                Ok(state) => state,
                Err(err) => {
                    self.incoming.discard(discard);
                    return Err(invalid_data(err));
                }
            };
            let outcome = match state {
                ConnectionState::ReadTraffic(mut traffic) => {
                    while let Some(record) = traffic.next_record() {
                        let record = record.map_err(invalid_data)?;
                        deliver(
                            record.payload,
                            read_into.as_deref_mut(),
                            &mut self.plaintext,
                        );
                    }
                    None
                }
                ConnectionState::EncodeTlsData(mut encode) => {
                    append(&mut self.outgoing, 1024, |buf| {
                        encode.encode(buf).map_err(encode_room)
                    })?;
                    None
                }
                // Our outgoing buffer keeps the order; it is written before anything
                // encoded later, by whoever next waits for the socket.
                ConnectionState::TransmitTlsData(transmit) => {
                    transmit.done();
                    None
                }
                ConnectionState::BlockedHandshake => Some((Step::Handshaking, false)),
                ConnectionState::PeerClosed => {
                    self.peer_closed = true;
                    None
                }
                ConnectionState::Closed => Some((Step::Closed, false)),
                ConnectionState::WriteTraffic(mut write) => {
                    let sent = match send.take() {
                        Some(Encrypt::Data(data)) => {
                            let guess = data.len() + 32 * (data.len() / 16384 + 2);
                            append(&mut self.outgoing, guess, |buf| {
                                write.encrypt(data, buf).map_err(encrypt_room)
                            })?;
                            true
                        }
                        Some(Encrypt::CloseNotify) => {
                            append(&mut self.outgoing, 64, |buf| {
                                write.queue_close_notify(buf).map_err(encrypt_room)
                            })?;
                            true
                        }
                        None => false,
                    };
                    Some((Step::Open, sent))
                }
                // Early data is never enabled; anything else is a rustls this code does
                // not know.
                _ => {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        "unexpected TLS connection state",
                    ));
                }
            };
            self.incoming.discard(discard);
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
    }

    /// Reads from the socket into `incoming`: at least [`READ_SIZE`], or the rest of a
    /// larger record already begun. `Ready(Ok(0))` is end of file.
    fn poll_fill(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        let want = READ_SIZE.max(self.incoming.record_remaining());
        // tokio's own read: a read that did not fill the room shows the socket drained,
        // so the next one waits for readiness instead of costing a `recvfrom` that
        // finds nothing.
        let mut room = ReadBuf::new(self.incoming.room(want));
        match Pin::new(&mut self.tcp).poll_read(cx, &mut room) {
            Poll::Ready(Ok(())) => {
                let n = room.filled().len();
                self.incoming.filled(n);
                Poll::Ready(Ok(n))
            }
            Poll::Ready(Err(err)) => Poll::Ready(Err(err)),
            Poll::Pending => {
                self.release_idle();
                Poll::Pending
            }
        }
    }

    /// Gives back the buffers that are empty: the connection is about to wait.
    fn release_idle(&mut self) {
        self.incoming.release_if_empty();
        if self.plain_at == self.plaintext.len() {
            self.plaintext = Vec::new();
            self.plain_at = 0;
        }
    }

    /// Writes `outgoing` to the socket until it is empty, then gives its room back.
    fn poll_write_out(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        while self.out_at < self.outgoing.len() {
            let n = ready!(Pin::new(&mut self.tcp).poll_write(cx, &self.outgoing[self.out_at..]))?;
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            self.out_at += n;
        }
        self.outgoing = Vec::new();
        self.out_at = 0;
        Poll::Ready(Ok(()))
    }
}

/// Ciphertext from the socket: `buf[start..end]` is not yet processed. Processing
/// discards from the front; reading appends at the end, moving what is left to the
/// front or growing only when there is no room, so bytes are zeroed once, not per read.
#[derive(Default)]
struct Incoming {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl Incoming {
    fn unprocessed(&mut self) -> &mut [u8] {
        &mut self.buf[self.start..self.end]
    }

    /// rustls is done with the first `n` unprocessed bytes.
    fn discard(&mut self, n: usize) {
        self.start = (self.start + n).min(self.end);
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        }
    }

    /// Room for `want` more bytes after the unprocessed ones.
    fn room(&mut self, want: usize) -> &mut [u8] {
        if self.buf.len() - self.end < want && self.start > 0 {
            self.buf.copy_within(self.start..self.end, 0);
            self.end -= self.start;
            self.start = 0;
        }
        if self.buf.len() - self.end < want {
            self.buf.resize(self.end + want, 0);
        }
        &mut self.buf[self.end..self.end + want]
    }

    /// `n` bytes were read into [`Incoming::room`].
    fn filled(&mut self, n: usize) {
        self.end += n;
    }

    /// Bytes still missing from the partial record at the front.
    fn record_remaining(&self) -> usize {
        let pending = &self.buf[self.start..self.end];
        match pending.get(..RECORD_HEADER) {
            Some(header) => {
                let len = usize::from(u16::from_be_bytes([header[3], header[4]]));
                (RECORD_HEADER + len).saturating_sub(pending.len())
            }
            None => 0,
        }
    }

    fn release_if_empty(&mut self) {
        if self.start == self.end {
            *self = Self::default();
        }
    }
}

impl AsyncRead for TlsServerStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            if this.plain_at < this.plaintext.len() {
                let n = buf.remaining().min(this.plaintext.len() - this.plain_at);
                buf.put_slice(&this.plaintext[this.plain_at..this.plain_at + n]);
                this.plain_at += n;
                if this.plain_at == this.plaintext.len() {
                    this.plaintext.clear();
                    this.plain_at = 0;
                }
                return Poll::Ready(Ok(()));
            }
            if this.peer_closed {
                return Poll::Ready(Ok(()));
            }
            let before = buf.filled().len();
            let processed = this.process(None, Some(buf));
            // What rustls sends by itself (a KeyUpdate's answer, an alert) goes out now
            // if the socket takes it, else with the next write or flush.
            let written = this.poll_write_out(cx);
            let (step, _) = processed?;
            if let Poll::Ready(Err(err)) = written {
                return Poll::Ready(Err(err));
            }
            if buf.filled().len() > before {
                return Poll::Ready(Ok(()));
            }
            if this.plain_at < this.plaintext.len() || this.peer_closed {
                continue;
            }
            if step == Step::Closed {
                return Poll::Ready(Ok(()));
            }
            if ready!(this.poll_fill(cx))? == 0 {
                return Poll::Ready(Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "peer closed connection without sending TLS close_notify",
                )));
            }
        }
    }
}

impl AsyncWrite for TlsServerStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        if this.outgoing.len() - this.out_at >= OUTGOING_LIMIT {
            ready!(this.poll_write_out(cx))?;
        }
        let data = &buf[..buf.len().min(WRITE_SIZE)];
        match this.process(Some(Encrypt::Data(data)), None)? {
            (_, true) => Poll::Ready(Ok(data.len())),
            (_, false) => Poll::Ready(Err(io::ErrorKind::BrokenPipe.into())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if !this.close_sent {
            this.close_sent = true;
            this.process(Some(Encrypt::CloseNotify), None)?;
        }
        ready!(this.poll_write_out(cx))?;
        Pin::new(&mut this.tcp).poll_shutdown(cx)
    }
}

/// Hands decrypted `data` to the reader: into `read_into` as far as it has room (one
/// copy, from the record decrypted in place), the rest to `spill`, which is read first
/// next time. Once something spilled, the reader's room is full, so the order holds.
fn deliver(data: &[u8], read_into: Option<&mut ReadBuf<'_>>, spill: &mut Vec<u8>) {
    let direct = read_into.map_or(0, |buf| {
        let n = buf.remaining().min(data.len());
        buf.put_slice(&data[..n]);
        n
    });
    spill.extend_from_slice(&data[direct..]);
}

/// Appends what `encode` writes to `out`, first offering `guess` bytes of room, then
/// the room it says it needs (`Err(Some(n))`).
fn append(
    out: &mut Vec<u8>,
    guess: usize,
    mut encode: impl FnMut(&mut [u8]) -> Result<usize, Option<usize>>,
) -> io::Result<()> {
    let start = out.len();
    let mut room = guess;
    for _ in 0..2 {
        out.resize(start + room, 0);
        match encode(&mut out[start..]) {
            Ok(n) => {
                out.truncate(start + n);
                return Ok(());
            }
            Err(Some(needed)) if needed > room => room = needed,
            Err(_) => break,
        }
    }
    out.truncate(start);
    Err(io::Error::other("TLS record encoding failed"))
}

fn encode_room(err: EncodeError) -> Option<usize> {
    match err {
        EncodeError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

fn encrypt_room(err: EncryptError) -> Option<usize> {
    match err {
        EncryptError::InsufficientSize(InsufficientSizeError { required_size }) => {
            Some(required_size)
        }
        _ => None,
    }
}

fn invalid_data(err: rustls::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, err)
}
