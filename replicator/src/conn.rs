//! Blocking framed peer connections and the hello / authentication handshake.
//!
//! Owns: reading and writing lockproto frames on a [`PeerStream`] (TCP, or
//! a simulated connection; the header is
//! bound-checked by `wire::parse_header` before the body and payload are
//! read, so a peer can never make us allocate more than
//! `MAX_BODY_LEN + MAX_PAYLOAD_LEN`), and the handshake of
//! `docs/PROTOCOL.md` "Connection states" 1-2.
//!
//! Invariants kept: nothing but `Hello` is accepted before the handshake
//! ends; with a secret configured, a peer that does not prove it is refused
//! with an `Error{code AUTH}` frame and an [`ReplError::AuthRefused`] here;
//! a node without a secret that meets a peer requiring one fails clearly
//! too (the peer's authenticated `Hello` is answered with an unauthenticated
//! one, then the connection ends); a node with neither a secret nor the
//! insecure mode answers a peer's Hello with `Error{code AUTH}` saying so
//! ([`Conn::refuse_unauthenticated`]). Every socket has read/write timeouts.
//! With a secret, every byte after the proof is encrypted and authenticated
//! ([`crate::secure`]: a Noise session keyed by the secret and both Hellos).

use std::io::{BufReader, BufWriter, Read, Write};
use std::time::Duration;

use sluice_lockproto::wire::{
    auth_response, codes, decode, decode_head, encode_into, parse_header, verify_auth, Hello,
    HEADER_LEN, NONCE_LEN, VERSION_MAJOR, VERSION_MINOR,
};
use sluice_lockproto::Message;

use sluice_engine::device::{AlignedBuf, BufPools, BLOCK_SIZE};

use crate::env::{Env, PeerStream};
use crate::error::{ReplError, Result};

/// Socket buffer sizes: small frames are batched into few syscalls.
const IO_BUF_BYTES: usize = 256 << 10;

/// Payload buffer sizes a connection recycles (a full copy sends extents
/// of one size, an incremental of many: the rest are allocated each).
const PAYLOAD_SIZES_MAX: usize = 4;

/// Most bytes of spare payload buffers per size per connection: the
/// destination's write-behind (16 MiB) in flight recycles them all.
const PAYLOAD_SPARE_BYTES: usize = 16 << 20;

/// Longest node name we accept from a peer.
pub const NODE_NAME_MAX: usize = 256;
/// Longest frame accepted before the handshake is done (a Hello, or an
/// error): nothing larger is buffered for a peer that has not proved
/// anything yet.
pub const PRE_AUTH_FRAME_MAX: usize = 16 << 10;

/// How a handshake finds the secret it shares with a peer, by the peer's
/// node name (see [`Conn::handshake_with`]).
pub type PeerKeyFn<'a> = dyn Fn(&str) -> std::result::Result<Option<Vec<u8>>, String> + 'a;

/// Which part of a frame [`Conn::read_full`] reads.
#[derive(Clone, Copy)]
enum Part {
    Header,
    Body,
}

/// One framed connection to a peer.
pub struct Conn {
    stream: Box<dyn PeerStream>,
    reader: BufReader<Box<dyn Read + Send>>,
    writer: BufWriter<Box<dyn Write + Send>>,
    /// Address (for messages).
    pub peer: String,
    /// The peer's node id once the handshake is done.
    pub peer_node: String,
    /// The peer's protocol minor version (from its Hello; 0 until then):
    /// what it understands beyond 2.0 (PROTOCOL.md).
    pub peer_minor: u16,
    buf: Vec<u8>,
    out: Vec<u8>,
    payload_at: (usize, usize),
    /// The last frame's payload, when it was read into its own buffer.
    payload: Option<AlignedBuf>,
    /// Recycled payload buffers.
    payloads: BufPools,
    secret: bool,
    my_node: String,
    /// The handshake finished: frames up to the protocol's bounds.
    authenticated: bool,
    /// Per-read timeout after the handshake.
    timeout: Duration,
    /// While the handshake runs: when it must be done (a peer dripping a
    /// byte per read timeout cannot hold it open longer).
    deadline: Option<std::time::Instant>,
}

impl Conn {
    /// Wrap a connected stream; `timeout` applies to every read and write.
    pub fn new(stream: Box<dyn PeerStream>, timeout: Duration) -> Result<Self> {
        let peer = stream.peer_label();
        let io = |op, source| ReplError::Io {
            peer: peer.clone(),
            op,
            source,
        };
        stream
            .set_read_timeout(Some(timeout))
            .map_err(|e| io("set read timeout", e))?;
        stream
            .set_write_timeout(Some(timeout))
            .map_err(|e| io("set write timeout", e))?;
        let reader: BufReader<Box<dyn Read + Send>> = BufReader::with_capacity(
            IO_BUF_BYTES,
            Box::new(
                stream
                    .try_clone_stream()
                    .map_err(|e| io("clone socket", e))?,
            ),
        );
        let writer: BufWriter<Box<dyn Write + Send>> = BufWriter::with_capacity(
            IO_BUF_BYTES,
            Box::new(
                stream
                    .try_clone_stream()
                    .map_err(|e| io("clone socket", e))?,
            ),
        );
        Ok(Conn {
            stream,
            reader,
            writer,
            peer: peer.clone(),
            peer_node: String::new(),
            peer_minor: 0,
            buf: Vec::new(),
            out: Vec::new(),
            payload_at: (0, 0),
            payload: None,
            payloads: BufPools::new(PAYLOAD_SIZES_MAX, PAYLOAD_SPARE_BYTES, usize::MAX),
            secret: false,
            my_node: String::new(),
            authenticated: false,
            timeout,
            deadline: None,
        })
    }

    /// Connect to `addr` through `env` with a connect timeout.
    pub fn connect(env: &dyn Env, addr: &str, timeout: Duration) -> Result<Self> {
        let s = env.connect(addr, timeout).map_err(|source| ReplError::Io {
            peer: addr.to_string(),
            op: "connect",
            source,
        })?;
        Conn::new(s, timeout)
    }

    /// Label for messages: `node (addr)`.
    pub fn who(&self) -> String {
        if self.peer_node.is_empty() {
            self.peer.clone()
        } else {
            format!("{} ({})", self.peer_node, self.peer)
        }
    }

    fn io(&self, op: &'static str, source: std::io::Error) -> ReplError {
        ReplError::Io {
            peer: self.who(),
            op,
            source,
        }
    }

    /// Queue one message, then `payload` raw (extents only). Frames are
    /// buffered: they leave at the latest when this side next waits for a
    /// frame ([`Conn::recv`]), on [`Conn::flush`] or [`Conn::close`].
    pub fn send(&mut self, msg: &Message, payload: &[u8]) -> Result<()> {
        let len = u32::try_from(payload.len())
            .map_err(|_| ReplError::Invalid("payload longer than 4 GiB".into()))?;
        let mut out = std::mem::take(&mut self.out);
        let r = encode_into(msg, len, &mut out)
            .map_err(ReplError::from)
            .and_then(|()| self.writer.write_all(&out).map_err(|e| self.io("send", e)))
            .and_then(|()| {
                if payload.is_empty() {
                    Ok(())
                } else {
                    self.writer
                        .write_all(payload)
                        .map_err(|e| self.io("send payload", e))
                }
            });
        self.out = out;
        r
    }

    /// Push buffered frames to the socket (`recv` does it first).
    pub fn flush(&mut self) -> Result<()> {
        self.writer.flush().map_err(|e| self.io("send", e))
    }

    /// Send an error frame (best effort: the connection ends next).
    pub fn send_error(&mut self, req_id: u64, code: u16, text: &str) {
        let _ = self.send(
            &Message::Error {
                req_id,
                code,
                text: text.to_string(),
            },
            &[],
        );
        let _ = self.flush();
    }

    /// Receive one frame; `Ok(None)` on a clean end of stream between frames.
    /// A frame we cannot decode is answered with an error frame.
    pub fn recv(&mut self) -> Result<Option<Message>> {
        let m = self.recv_raw()?;
        match m {
            Some(Message::Hello(h))
                if !self.peer_node.is_empty() && h.auth.is_some() && !self.secret =>
            {
                // The peer requires a shared secret and we have none: answer
                // so it can refuse clearly, and stop here too.
                let _ = self.send(&Message::Hello(self.hello(None, [0; NONCE_LEN])), &[]);
                let _ = self.flush();
                Err(ReplError::AuthRefused {
                    peer: self.who(),
                    detail: "the peer requires a shared peer secret and this node runs without one; start both with the same --peer-secret".into(),
                })
            }
            Some(Message::Error { code, text, .. }) if code == codes::AUTH => {
                Err(ReplError::AuthRefused {
                    peer: self.who(),
                    detail: text,
                })
            }
            other => Ok(other),
        }
    }

    fn recv_raw(&mut self) -> Result<Option<Message>> {
        // Everything sent so far goes out before we wait for an answer.
        self.flush()?;
        self.buf.resize(HEADER_LEN, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.read_full(&mut buf, 0, Part::Header);
        self.buf = buf;
        if !r? {
            return Ok(None);
        }
        let hd = match parse_header(&self.buf) {
            Ok(h) => h,
            Err(e) => return Err(self.bad_frame(e)),
        };
        let need = hd.frame_len();
        if !self.authenticated && need > PRE_AUTH_FRAME_MAX {
            let text = format!(
                "a frame of {need} bytes before the handshake finished (at most {PRE_AUTH_FRAME_MAX})"
            );
            return Err(self.bad_frame(text));
        }
        self.payload = None;
        let payload = hd.payload_len as usize;
        if payload > 0 && payload.is_multiple_of(BLOCK_SIZE) && self.authenticated {
            // Extent data: read straight into a block buffer the engine
            // can write (recycled), not copied out of the frame buffer.
            let head = need - payload;
            self.buf.resize(head, 0);
            let mut buf = std::mem::take(&mut self.buf);
            let r = self.read_full(&mut buf, HEADER_LEN, Part::Body);
            self.buf = buf;
            r?;
            let mut data = self.payloads.take(payload / BLOCK_SIZE);
            self.read_full(data.as_mut_slice(), 0, Part::Body)?;
            self.payload = Some(data);
            self.payload_at = (0, 0);
            return match decode_head(&self.buf) {
                Ok((_, msg)) => Ok(Some(msg)),
                Err(e) => Err(self.bad_frame(e)),
            };
        }
        self.buf.resize(need, 0);
        let mut buf = std::mem::take(&mut self.buf);
        let r = self.read_full(&mut buf, HEADER_LEN, Part::Body);
        self.buf = buf;
        r?;
        match decode(&self.buf) {
            Ok(Some(d)) => {
                self.payload_at = (need - d.payload.len(), need);
                Ok(Some(d.msg))
            }
            Ok(None) => Err(ReplError::Protocol {
                peer: self.who(),
                detail: "frame shorter than its header says".into(),
            }),
            Err(e) => Err(self.bad_frame(e)),
        }
    }

    /// A frame the peer sent is malformed: tell it (best effort), and the
    /// error to end the connection with.
    fn bad_frame(&mut self, e: impl std::fmt::Display) -> ReplError {
        let text = e.to_string();
        self.send_error(0, codes::BAD_FRAME, &text);
        ReplError::Protocol {
            peer: self.who(),
            detail: text,
        }
    }

    /// Fill `buf[at..]` from the socket. False: the peer closed the
    /// connection cleanly, before the first byte of a frame's header.
    fn read_full(&mut self, buf: &mut [u8], mut at: usize, part: Part) -> Result<bool> {
        let (op, inside) = match part {
            Part::Header => ("receive", "connection closed inside a frame header"),
            Part::Body => ("receive frame body", "connection closed inside a frame"),
        };
        let start = at;
        while at < buf.len() {
            self.arm_deadline()?;
            let Some(rest) = buf.get_mut(at..) else {
                break;
            };
            match self.reader.read(rest) {
                Ok(0) if matches!(part, Part::Header) && at == start => return Ok(false),
                Ok(0) => {
                    return Err(self.io(
                        op,
                        std::io::Error::new(std::io::ErrorKind::UnexpectedEof, inside),
                    ))
                }
                Ok(n) => at += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(self.io(op, e)),
            }
        }
        Ok(true)
    }

    /// The raw payload of the last received frame.
    pub fn payload(&self) -> &[u8] {
        match &self.payload {
            Some(b) => b.as_slice(),
            None => self
                .buf
                .get(self.payload_at.0..self.payload_at.1)
                .unwrap_or(&[]),
        }
    }

    /// The payload of the last received frame as a block buffer for the
    /// engine: the buffer it was read into when it is whole blocks (no
    /// copy), else a copy. Afterwards [`Conn::payload`] is empty.
    pub fn take_payload(&mut self) -> AlignedBuf {
        match self.payload.take() {
            Some(b) => b,
            None => {
                let b = AlignedBuf::from_slice(self.payload());
                self.payload_at = (0, 0);
                b
            }
        }
    }

    fn hello(&self, auth: Option<[u8; 32]>, nonce: [u8; NONCE_LEN]) -> Hello {
        Hello {
            node_id: self.my_node.clone(),
            major: VERSION_MAJOR,
            minor: VERSION_MINOR,
            nonce,
            auth,
        }
    }

    /// The handshake (both sides run the same steps): exchange `Hello`s,
    /// then, with a secret, prove it and check the peer's proof. Returns
    /// the peer's node id.
    /// Exchange Hellos (and prove the secret, if one is set) within one
    /// peer timeout in all, however the peer paces its bytes.
    pub fn handshake(&mut self, node: &str, secret: Option<&[u8]>) -> Result<String> {
        let key = secret.map(<[u8]>::to_vec);
        self.handshake_with(node, &|_| Ok(key.clone()))
    }

    /// [`Self::handshake`] with the secret chosen by the peer's name, once
    /// its Hello told it: `Ok(Some)` the secret this pair shares, `Ok(None)`
    /// no authentication (insecure mode), `Err(why)` this node has no
    /// secret for that peer: it is refused with `why`.
    pub fn handshake_with(&mut self, node: &str, key: &PeerKeyFn<'_>) -> Result<String> {
        self.deadline = Some(std::time::Instant::now() + self.timeout);
        let r = self.handshake_inner(node, key);
        self.deadline = None;
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        self.authenticated = r.is_ok();
        r
    }

    /// Before a read during the handshake: the socket times out when the
    /// handshake's deadline passes.
    fn arm_deadline(&mut self) -> Result<()> {
        let Some(d) = self.deadline else {
            return Ok(());
        };
        let left = d.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(self.io(
                "handshake",
                std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    format!(
                        "the handshake did not finish within {} s",
                        self.timeout.as_secs_f64()
                    ),
                ),
            ));
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(|e| self.io("set read timeout", e))
    }

    fn handshake_inner(&mut self, node: &str, key: &PeerKeyFn<'_>) -> Result<String> {
        self.my_node = node.to_string();
        // Until the peer's name is known: whether this node uses secrets.
        self.secret = key("").is_ok_and(|k| k.is_some());
        let nonce: [u8; NONCE_LEN] = rand::random();
        self.send(&Message::Hello(self.hello(None, nonce)), &[])?;
        let peer = match self.recv_raw()? {
            Some(Message::Hello(h)) => h,
            Some(Message::Error { code, text, .. }) if code == codes::AUTH => {
                return Err(ReplError::AuthRefused {
                    peer: self.who(),
                    detail: text,
                })
            }
            Some(Message::Error { code, text, .. }) => {
                return Err(ReplError::Remote {
                    peer: self.who(),
                    code,
                    text,
                })
            }
            Some(other) => {
                let text = format!("expected Hello, got message type {}", other.type_code());
                return Err(self.bad_frame(text));
            }
            None => {
                return Err(ReplError::Protocol {
                    peer: self.who(),
                    detail: "connection closed before Hello".into(),
                })
            }
        };
        if peer.node_id.is_empty() || peer.node_id.len() > NODE_NAME_MAX || peer.node_id == node {
            let text = if peer.node_id == node {
                format!(
                    "peer node id {node:?} is this node's own name: the address is this node (a mirror's source is another node), or two nodes share a name"
                )
            } else {
                format!(
                    "peer node id {:?} is empty or longer than {NODE_NAME_MAX} bytes",
                    peer.node_id
                )
            };
            return Err(self.bad_frame(text));
        }
        self.peer_node = peer.node_id.clone();
        self.peer_minor = peer.minor;
        let secret = match key(&peer.node_id) {
            Ok(Some(s)) => s,
            Ok(None) => {
                self.secret = false;
                return Ok(peer.node_id);
            }
            Err(detail) => {
                self.send_error(
                    0,
                    codes::AUTH,
                    &format!("node {node} refused {}: {detail}", peer.node_id),
                );
                return Err(ReplError::AuthRefused {
                    peer: self.who(),
                    detail,
                });
            }
        };
        self.secret = true;
        let secret = secret.as_slice();
        let proof = auth_response(secret, &peer.nonce, &peer.node_id, node)?;
        self.send(&Message::Hello(self.hello(Some(proof), nonce)), &[])?;
        let refuse = |c: &mut Conn, detail: String| {
            c.send_error(
                0,
                codes::AUTH,
                &format!("node {node} refused {}: {detail}", c.peer_node),
            );
            Err(ReplError::AuthRefused {
                peer: c.who(),
                detail,
            })
        };
        match self.recv_raw()? {
            Some(Message::Hello(Hello { auth: Some(a), .. })) => {
                if verify_auth(secret, &nonce, node, &peer.node_id, &a).is_err() {
                    return refuse(self, "secrets differ (its answer to our challenge is wrong)".into());
                }
                self.encrypt(secret, node, &nonce, &peer.node_id, &peer.nonce)?;
                Ok(peer.node_id)
            }
            Some(Message::Hello(Hello { auth: None, .. })) => refuse(
                self,
                "it runs without a peer secret; start it with the same --peer-secret".into(),
            ),
            Some(Message::Error { code, text, .. }) if code == codes::AUTH => {
                Err(ReplError::AuthRefused {
                    peer: self.who(),
                    detail: text,
                })
            }
            Some(other) => refuse(
                self,
                format!(
                    "it sent message type {} without authenticating (it runs without a peer secret?)",
                    other.type_code()
                ),
            ),
            None => Err(ReplError::AuthRefused {
                peer: self.who(),
                detail: "connection closed during authentication (secrets differ, or the peer has none)".into(),
            }),
        }
    }

    /// Refuse this peer because this node has no peer secret and is not in
    /// insecure mode: read its Hello (within the handshake deadline, so the
    /// reply is not lost to a reset for unread bytes, and to learn the name
    /// it claims), answer with an `Error{code AUTH}` that tells its
    /// operator what this node requires, and return the refusal.
    pub fn refuse_unauthenticated(&mut self, node: &str) -> ReplError {
        self.deadline = Some(std::time::Instant::now() + self.timeout);
        if let Ok(Some(Message::Hello(h))) = self.recv_raw() {
            if !h.node_id.is_empty() && h.node_id.len() <= NODE_NAME_MAX {
                self.peer_node = h.node_id;
            }
        }
        self.deadline = None;
        self.send_error(
            0,
            codes::AUTH,
            &format!(
                "node {node} requires a peer secret and has none configured, so it refuses every peer: its operator must set peer_secret (the same file as this node's), or insecure_peers = true on both nodes on a trusted network"
            ),
        );
        ReplError::AuthRefused {
            peer: self.who(),
            detail: "this node has no peer secret and insecure mode is off, so it accepts no peers; set peer_secret (serve --peer-secret FILE, the same on both nodes) or insecure_peers = true (serve --insecure-peers) on a trusted network".into(),
        }
    }

    /// Switch to the encrypted session ([`crate::secure`]) right after both
    /// proofs: the Noise handshake runs through the buffered halves (a
    /// record the peer already sent may sit in the read buffer), then
    /// both halves are wrapped.
    fn encrypt(
        &mut self,
        secret: &[u8],
        node: &str,
        nonce: &[u8; NONCE_LEN],
        peer_node: &str,
        peer_nonce: &[u8; NONCE_LEN],
    ) -> Result<()> {
        let initiator = node < peer_node;
        let mut prologue = Vec::new();
        let (first, second) = if initiator {
            ((node, nonce), (peer_node, peer_nonce))
        } else {
            ((peer_node, peer_nonce), (node, nonce))
        };
        for (name, n) in [first, second] {
            prologue.extend_from_slice(n);
            prologue.extend_from_slice(name.as_bytes());
            prologue.push(0);
        }
        self.flush()?;
        let who = self.who();
        self.arm_deadline()?;
        let st = crate::secure::establish(
            &who,
            secret,
            initiator,
            &prologue,
            &mut self.reader,
            &mut self.writer,
        )?;
        let old_reader =
            std::mem::replace(&mut self.reader, BufReader::new(Box::new(std::io::empty())));
        let old_writer =
            std::mem::replace(&mut self.writer, BufWriter::new(Box::new(std::io::sink())));
        let raw_writer = old_writer
            .into_inner()
            .map_err(|e| self.io("send", e.into_error()))?;
        self.reader = BufReader::with_capacity(
            IO_BUF_BYTES,
            Box::new(crate::secure::SealedReader::new(old_reader, st.clone())),
        );
        self.writer = BufWriter::with_capacity(
            IO_BUF_BYTES,
            Box::new(crate::secure::SealedWriter::new(raw_writer, st)),
        );
        Ok(())
    }

    /// A second handle on the socket (to shut it down from another thread).
    pub fn socket(&self) -> Option<Box<dyn PeerStream>> {
        self.stream.try_clone_stream().ok()
    }

    /// Shut the socket down both ways (unblocks a reader on another thread).
    pub fn close(&mut self) {
        let _ = self.flush();
        self.stream.shutdown_both();
    }
}
