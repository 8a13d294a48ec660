//! The NBD wire protocol as a sans-IO codec: byte layouts, parsing with
//! bounds, encoding, and the option-haggling decisions. No sockets here:
//! [`super::server`] moves bytes, this module says what they mean.
//!
//! Scope (see the NBD `doc/proto.md`): fixed newstyle negotiation with
//! `NBD_OPT_EXPORT_NAME`, `NBD_OPT_ABORT`, `NBD_OPT_LIST`, `NBD_OPT_INFO`
//! and `NBD_OPT_GO`; every other option gets `NBD_REP_ERR_UNSUP`.
//! Transmission with simple replies only (no structured replies, no
//! extended headers).
//!
//! Invariants kept:
//! - Every length that comes from the peer is bounded before anything is
//!   allocated for it: option data by [`OPTION_DATA_MAX_BYTES`], read and
//!   write payloads by [`PAYLOAD_MAX_BYTES`], names by [`NAME_MAX_BYTES`].
//! - Parsing never panics on any input (the hostile tests feed it garbage).
//! - A request whose framing is still trustworthy (known command, bounded
//!   payload) gets an errno reply; one whose framing is not (bad magic,
//!   unknown command, oversized payload) is a [`NodeError`] (its `Nbd*` variants) and the
//!   connection closes.

use crate::error::NodeError;
use sluice_engine::api::{Image, NsName};
use sluice_engine::device::BLOCK_SIZE;

// --- Negotiation constants ---
/// "NBDMAGIC": the first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// "IHAVEOPT": newstyle negotiation magic, also the option request magic.
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
/// Magic at the start of every option reply.
pub const OPTION_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

/// Handshake flags (server, 16 bits).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags (32 bits).
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;

pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
pub const REP_ERR_POLICY: u32 = (1 << 31) + 2;
pub const REP_ERR_INVALID: u32 = (1 << 31) + 3;
pub const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;
pub const REP_ERR_SHUTDOWN: u32 = (1 << 31) + 7;

pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

// --- Transmission constants ---
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;

/// Transmission flags (16 bits, per export).
pub const TFLAG_HAS_FLAGS: u16 = 1 << 0;
pub const TFLAG_READ_ONLY: u16 = 1 << 1;
pub const TFLAG_SEND_FLUSH: u16 = 1 << 2;
pub const TFLAG_SEND_FUA: u16 = 1 << 3;
pub const TFLAG_SEND_TRIM: u16 = 1 << 5;
pub const TFLAG_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TFLAG_CAN_MULTI_CONN: u16 = 1 << 8;

pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;
pub const CMD_RESIZE: u16 = 8;

pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;

/// NBD error values (they are Linux errno numbers on the wire).
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// --- Bounds ---
/// Largest read or write payload (advertised as the maximum block size).
pub const PAYLOAD_MAX_BYTES: u32 = 32 << 20;
/// Preferred block size advertised: the engine's block.
pub const PREFERRED_BLOCK_BYTES: u32 = BLOCK_SIZE as u32;
/// Minimum block size advertised: 1, unaligned requests are served
/// (read-modify-write on the server).
pub const MIN_BLOCK_BYTES: u32 = 1;
/// Largest option data accepted; longer options close the connection.
pub const OPTION_DATA_MAX_BYTES: u32 = 64 << 10;
/// Longest export name (the spec's hard limit for strings).
pub const NAME_MAX_BYTES: usize = 4096;
/// Most options in one negotiation (LIST/INFO loops are bounded).
pub const OPTIONS_MAX: usize = 1024;
/// Most info requests in one NBD_OPT_INFO/GO.
pub const INFO_REQUESTS_MAX: usize = 64;

/// Bytes of the server greeting, the option header, a request header and
/// a simple reply header.
pub const GREETING_BYTES: usize = 18;
pub const OPTION_HEADER_BYTES: usize = 16;
pub const REQUEST_HEADER_BYTES: usize = 28;
pub const SIMPLE_REPLY_BYTES: usize = 16;

// ------------------------------------------------------------------------
// Negotiation
// ------------------------------------------------------------------------

/// What the server sends first: NBDMAGIC, IHAVEOPT, handshake flags.
pub fn greeting() -> [u8; GREETING_BYTES] {
    let mut g = [0u8; GREETING_BYTES];
    g[0..8].copy_from_slice(&NBD_MAGIC.to_be_bytes());
    g[8..16].copy_from_slice(&IHAVEOPT.to_be_bytes());
    g[16..18].copy_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    g
}

/// What the client answered to the greeting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientFlags {
    /// The client does not want the 124 zero bytes after EXPORT_NAME.
    pub no_zeroes: bool,
}

/// Parse the 32-bit client flags. The spec: the server MUST drop the
/// connection on unknown flags. A client without FIXED_NEWSTYLE is refused
/// too (this server only speaks fixed newstyle).
pub fn parse_client_flags(b: [u8; 4]) -> Result<ClientFlags, NodeError> {
    let flags = u32::from_be_bytes(b);
    let known = FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES;
    if flags & !known != 0 || flags & FLAG_C_FIXED_NEWSTYLE == 0 {
        return Err(NodeError::NbdBadClientFlags { flags });
    }
    Ok(ClientFlags {
        no_zeroes: flags & FLAG_C_NO_ZEROES != 0,
    })
}

/// An option request's header: which option, how many data bytes follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse an option header; the data length is bounded here, before the
/// caller allocates for it.
pub fn parse_option_header(b: &[u8; OPTION_HEADER_BYTES]) -> Result<OptionHeader, NodeError> {
    let magic = be_u64(b, 0);
    if magic != IHAVEOPT {
        return Err(NodeError::NbdBadOptionMagic { magic });
    }
    let option = be_u32(b, 8);
    let len = be_u32(b, 12);
    if len > OPTION_DATA_MAX_BYTES {
        return Err(NodeError::NbdOptionTooLong {
            option,
            len,
            max: OPTION_DATA_MAX_BYTES,
        });
    }
    Ok(OptionHeader { option, len })
}

/// The body of NBD_OPT_INFO / NBD_OPT_GO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    /// NBD_INFO_* types the client asked for.
    pub infos: Vec<u16>,
}

/// A parsed option request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OptionRequest {
    ExportName(String),
    Abort,
    List,
    Info(InfoRequest),
    Go(InfoRequest),
    /// Known option, malformed data: reply NBD_REP_ERR_INVALID.
    Invalid {
        option: u32,
        reason: String,
    },
    /// Unknown or unsupported option: reply NBD_REP_ERR_UNSUP.
    Unsupported {
        option: u32,
    },
}

/// Parse an option's data (already bounded by [`parse_option_header`]).
pub fn parse_option(option: u32, data: &[u8]) -> OptionRequest {
    let invalid = |reason: String| OptionRequest::Invalid { option, reason };
    match option {
        OPT_EXPORT_NAME => match name_from(data) {
            Ok(n) => OptionRequest::ExportName(n),
            // EXPORT_NAME cannot report errors: an invalid name is simply
            // an unknown export (the caller closes the session).
            Err(_) => OptionRequest::ExportName(String::from_utf8_lossy(data).into_owned()),
        },
        OPT_ABORT => OptionRequest::Abort,
        OPT_LIST => {
            if data.is_empty() {
                OptionRequest::List
            } else {
                invalid(format!("NBD_OPT_LIST carries {} bytes of data", data.len()))
            }
        }
        OPT_INFO | OPT_GO => match parse_info_request(data) {
            Ok(r) if option == OPT_GO => OptionRequest::Go(r),
            Ok(r) => OptionRequest::Info(r),
            Err(reason) => invalid(reason),
        },
        _ => OptionRequest::Unsupported { option },
    }
}

fn name_from(b: &[u8]) -> Result<String, String> {
    if b.len() > NAME_MAX_BYTES {
        return Err(format!(
            "export name of {} bytes; at most {NAME_MAX_BYTES}",
            b.len()
        ));
    }
    let s = std::str::from_utf8(b).map_err(|_| "export name is not UTF-8".to_string())?;
    if s.contains('\0') {
        return Err("export name contains NUL".to_string());
    }
    Ok(s.to_string())
}

fn parse_info_request(d: &[u8]) -> Result<InfoRequest, String> {
    if d.len() < 6 {
        return Err(format!(
            "INFO/GO data of {} bytes; at least 6 needed",
            d.len()
        ));
    }
    let name_len = be_u32(d, 0) as usize;
    let rest = d.len() - 4;
    if name_len > rest.saturating_sub(2) {
        return Err(format!(
            "name length {name_len} exceeds the {rest} bytes that follow"
        ));
    }
    let name = name_from(&d[4..4 + name_len])?;
    let at = 4 + name_len;
    let n = be_u16(d, at) as usize;
    let infos_bytes = &d[at + 2..];
    if infos_bytes.len() != n * 2 {
        return Err(format!(
            "{n} info requests announced, {} bytes of them sent",
            infos_bytes.len()
        ));
    }
    if n > INFO_REQUESTS_MAX {
        return Err(format!("{n} info requests; at most {INFO_REQUESTS_MAX}"));
    }
    let infos = (0..n).map(|i| be_u16(infos_bytes, 2 * i)).collect();
    Ok(InfoRequest { name, infos })
}

/// An export: what a name resolves to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Export {
    /// The name as the client gave it (`VOL`, `VOL/QTREE`, `VOL@SNAP`, ...).
    pub name: String,
    pub image: Image,
    pub size_bytes: u64,
    /// Snapshots, and read-only (mirror destination) volumes and qtrees.
    pub read_only: bool,
}

impl Export {
    /// The transmission flags advertised for this export.
    pub fn transmission_flags(&self) -> u16 {
        let common = TFLAG_HAS_FLAGS | TFLAG_SEND_FLUSH | TFLAG_SEND_FUA | TFLAG_CAN_MULTI_CONN;
        if self.read_only {
            common | TFLAG_READ_ONLY
        } else {
            common | TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES
        }
    }

    fn description(&self) -> String {
        let what = if self.image.snapshot.is_some() {
            "snapshot of"
        } else if self.image.ns.qtree.is_some() {
            "qtree"
        } else {
            "volume"
        };
        let ro = if self.read_only { ", read-only" } else { "" };
        format!("sluice {what} {}{ro}", self.image.ns)
    }
}

/// Split an export name into the image it names: `VOL`, `VOL/QTREE`,
/// `VOL@SNAP`, `VOL/QTREE@SNAP`. Engine names never hold `/` or `@`, so
/// the split is unambiguous. Only the syntax is checked here.
pub fn parse_export_name(name: &str) -> Result<Image, String> {
    let (path, snapshot) = match name.split_once('@') {
        Some((p, s)) => (p, Some(s)),
        None => (name, None),
    };
    let (volume, qtree) = match path.split_once('/') {
        Some((v, q)) => (v, Some(q)),
        None => (path, None),
    };
    let ok = |s: &str| !s.is_empty() && !s.contains('/') && !s.contains('@');
    if !ok(volume) || !qtree.is_none_or(ok) || !snapshot.is_none_or(ok) {
        return Err(format!(
            "export name {name:?} is not VOL, VOL/QTREE, VOL@SNAP or VOL/QTREE@SNAP"
        ));
    }
    Ok(Image {
        ns: NsName {
            volume: volume.to_string(),
            qtree: qtree.map(str::to_string),
        },
        snapshot: snapshot.map(str::to_string),
    })
}

/// An option refused with an error reply and a message for the user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OptionRefusal {
    /// An NBD_REP_ERR_* value.
    pub code: u32,
    pub message: String,
}

/// Where exports come from: the server answers from the engine; unit tests
/// from a table.
pub trait Catalog {
    /// Resolve a name; a refusal carries the NBD_REP_ERR_* to send.
    fn lookup(&mut self, name: &str) -> Result<Export, OptionRefusal>;
    /// Every export name.
    fn list(&mut self) -> Result<Vec<String>, OptionRefusal>;
}

/// What the connection does after an option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Send the reply bytes, read the next option.
    Continue,
    /// Send the reply bytes, close the connection (ABORT).
    Close,
    /// Send the reply bytes, enter the transmission phase on this export.
    Transmit(Export),
}

/// Decide one option: append the reply bytes to `out` and say what next.
/// `Err` is a protocol violation that ends the session without a reply
/// (only EXPORT_NAME of an unknown export: that option cannot report
/// errors).
pub fn negotiate(
    req: &OptionRequest,
    flags: ClientFlags,
    catalog: &mut impl Catalog,
    out: &mut Vec<u8>,
) -> Result<Step, NodeError> {
    match req {
        OptionRequest::ExportName(name) => match catalog.lookup(name) {
            Ok(export) => {
                encode_export_name_reply(out, &export, flags.no_zeroes);
                Ok(Step::Transmit(export))
            }
            Err(_) => Err(NodeError::NbdExportNameUnknown { name: name.clone() }),
        },
        OptionRequest::Abort => {
            encode_option_reply(out, OPT_ABORT, REP_ACK, &[]);
            Ok(Step::Close)
        }
        OptionRequest::List => {
            match catalog.list() {
                Ok(names) => {
                    for n in names {
                        let mut d = Vec::with_capacity(4 + n.len());
                        d.extend_from_slice(&(n.len() as u32).to_be_bytes());
                        d.extend_from_slice(n.as_bytes());
                        encode_option_reply(out, OPT_LIST, REP_SERVER, &d);
                    }
                    encode_option_reply(out, OPT_LIST, REP_ACK, &[]);
                }
                Err(r) => encode_option_error(out, OPT_LIST, r.code, &r.message),
            }
            Ok(Step::Continue)
        }
        OptionRequest::Info(r) | OptionRequest::Go(r) => {
            let option = if matches!(req, OptionRequest::Go(_)) {
                OPT_GO
            } else {
                OPT_INFO
            };
            let export = match catalog.lookup(&r.name) {
                Ok(e) => e,
                Err(refusal) => {
                    encode_option_error(out, option, refusal.code, &refusal.message);
                    return Ok(Step::Continue);
                }
            };
            encode_info_replies(out, option, &export, &r.infos);
            encode_option_reply(out, option, REP_ACK, &[]);
            if option == OPT_GO {
                Ok(Step::Transmit(export))
            } else {
                Ok(Step::Continue)
            }
        }
        OptionRequest::Invalid { option, reason } => {
            encode_option_error(out, *option, REP_ERR_INVALID, reason);
            Ok(Step::Continue)
        }
        OptionRequest::Unsupported { option } => {
            let msg = match *option {
                OPT_STARTTLS => "TLS is not supported by this server".to_string(),
                OPT_STRUCTURED_REPLY => "structured replies are not supported".to_string(),
                o => format!("option {o} is not supported"),
            };
            encode_option_error(out, *option, REP_ERR_UNSUP, &msg);
            Ok(Step::Continue)
        }
    }
}

/// Append one option reply: magic, option, reply type, length, data.
pub fn encode_option_reply(out: &mut Vec<u8>, option: u32, reply: u32, data: &[u8]) {
    out.extend_from_slice(&OPTION_REPLY_MAGIC.to_be_bytes());
    out.extend_from_slice(&option.to_be_bytes());
    out.extend_from_slice(&reply.to_be_bytes());
    out.extend_from_slice(&(data.len() as u32).to_be_bytes());
    out.extend_from_slice(data);
}

/// Append an error reply with a human message (truncated to the spec's
/// string limit).
pub fn encode_option_error(out: &mut Vec<u8>, option: u32, code: u32, message: &str) {
    // Cut at a character boundary: the message stays valid UTF-8.
    let mut end = message.len().min(NAME_MAX_BYTES);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    encode_option_reply(out, option, code, &message.as_bytes()[..end]);
}

/// NBD_REP_INFO replies: always EXPORT and BLOCK_SIZE (the spec lets a
/// server send block sizes unasked), NAME and DESCRIPTION when asked.
fn encode_info_replies(out: &mut Vec<u8>, option: u32, export: &Export, asked: &[u16]) {
    let mut d = Vec::with_capacity(12);
    d.extend_from_slice(&INFO_EXPORT.to_be_bytes());
    d.extend_from_slice(&export.size_bytes.to_be_bytes());
    d.extend_from_slice(&export.transmission_flags().to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);

    let mut d = Vec::with_capacity(14);
    d.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
    d.extend_from_slice(&MIN_BLOCK_BYTES.to_be_bytes());
    d.extend_from_slice(&PREFERRED_BLOCK_BYTES.to_be_bytes());
    d.extend_from_slice(&PAYLOAD_MAX_BYTES.to_be_bytes());
    encode_option_reply(out, option, REP_INFO, &d);

    if asked.contains(&INFO_NAME) {
        let mut d = INFO_NAME.to_be_bytes().to_vec();
        d.extend_from_slice(export.name.as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
    if asked.contains(&INFO_DESCRIPTION) {
        let mut d = INFO_DESCRIPTION.to_be_bytes().to_vec();
        d.extend_from_slice(export.description().as_bytes());
        encode_option_reply(out, option, REP_INFO, &d);
    }
}

/// The old-style answer to NBD_OPT_EXPORT_NAME: size, flags, and 124 zero
/// bytes unless the client asked for NO_ZEROES.
pub fn encode_export_name_reply(out: &mut Vec<u8>, export: &Export, no_zeroes: bool) {
    out.extend_from_slice(&export.size_bytes.to_be_bytes());
    out.extend_from_slice(&export.transmission_flags().to_be_bytes());
    if !no_zeroes {
        out.extend_from_slice(&[0u8; 124]);
    }
}

// ------------------------------------------------------------------------
// Transmission
// ------------------------------------------------------------------------

/// A request header as it came off the wire, framing already checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHeader {
    pub flags: u16,
    pub command: u16,
    pub handle: u64,
    pub offset: u64,
    pub len: u32,
}

impl RequestHeader {
    /// Bytes of payload that follow this header (writes only).
    pub fn payload_bytes(&self) -> u32 {
        if self.command == CMD_WRITE {
            self.len
        } else {
            0
        }
    }
}

/// Parse a request header. Errors are the framing violations after which
/// the stream cannot be trusted: bad magic, an unknown command (its payload
/// size is unknown), a read or write longer than [`PAYLOAD_MAX_BYTES`].
pub fn parse_request_header(b: &[u8; REQUEST_HEADER_BYTES]) -> Result<RequestHeader, NodeError> {
    let magic = be_u32(b, 0);
    if magic != REQUEST_MAGIC {
        return Err(NodeError::NbdBadRequestMagic { magic });
    }
    let h = RequestHeader {
        flags: be_u16(b, 4),
        command: be_u16(b, 6),
        handle: be_u64(b, 8),
        offset: be_u64(b, 16),
        len: be_u32(b, 24),
    };
    if h.command > CMD_RESIZE {
        return Err(NodeError::NbdUnknownCommand { command: h.command });
    }
    if matches!(h.command, CMD_READ | CMD_WRITE) && h.len > PAYLOAD_MAX_BYTES {
        return Err(NodeError::NbdPayloadTooLong {
            command: h.command,
            len: h.len,
            max: PAYLOAD_MAX_BYTES,
        });
    }
    Ok(h)
}

/// A validated command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    WriteZeroes { offset: u64, len: u32, fua: bool },
    Disc,
}

/// Validate a header against its export. `Err(errno)` is the reply to send
/// (the caller still consumes a write's payload first). Checks: flags the
/// command may carry, read-only exports, the range within the export.
pub fn validate(h: &RequestHeader, export: &Export) -> Result<Command, u32> {
    let allowed = match h.command {
        CMD_WRITE_ZEROES => CMD_FLAG_FUA | CMD_FLAG_NO_HOLE,
        _ => CMD_FLAG_FUA,
    };
    if h.flags & !allowed != 0 {
        return Err(EINVAL);
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let writes = matches!(h.command, CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES);
    if writes && export.read_only {
        return Err(EPERM);
    }
    let ranged = matches!(
        h.command,
        CMD_READ | CMD_WRITE | CMD_TRIM | CMD_WRITE_ZEROES
    );
    if ranged {
        let end = h.offset.checked_add(h.len as u64).ok_or(EINVAL)?;
        if end > export.size_bytes {
            return Err(EINVAL);
        }
    }
    let (offset, len) = (h.offset, h.len);
    match h.command {
        CMD_READ => Ok(Command::Read { offset, len }),
        CMD_WRITE => Ok(Command::Write { offset, len, fua }),
        CMD_DISC => Ok(Command::Disc),
        CMD_FLUSH => Ok(Command::Flush),
        CMD_TRIM => Ok(Command::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES => Ok(Command::WriteZeroes { offset, len, fua }),
        // Known, never advertised (CACHE, BLOCK_STATUS, RESIZE).
        _ => Err(EINVAL),
    }
}

/// A simple reply header: magic, error, handle.
pub fn encode_simple_reply(error: u32, handle: u64) -> [u8; SIMPLE_REPLY_BYTES] {
    let mut b = [0u8; SIMPLE_REPLY_BYTES];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&handle.to_be_bytes());
    b
}

/// The whole blocks a byte range touches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub lba: u64,
    pub len_blocks: u64,
    /// Bytes of the first block before the range starts.
    pub head_bytes: usize,
}

impl Span {
    /// Blocks covering `[offset, offset + len)`; `len > 0`.
    pub fn covering(offset: u64, len: u64) -> Span {
        let bs = BLOCK_SIZE as u64;
        let lba = offset / bs;
        let end = offset.saturating_add(len);
        let last = end.div_ceil(bs);
        Span {
            lba,
            len_blocks: last - lba,
            head_bytes: (offset % bs) as usize,
        }
    }

    /// Whether the range is exactly these blocks.
    pub fn aligned(offset: u64, len: u64) -> bool {
        let bs = BLOCK_SIZE as u64;
        offset.is_multiple_of(bs) && len.is_multiple_of(bs)
    }
}

/// Cut `[lba, lba + len_blocks)` into pieces of at most `max_blocks`.
pub fn split(lba: u64, len_blocks: u64, max_blocks: u64) -> Vec<(u64, u64)> {
    let max = max_blocks.max(1);
    let mut out = Vec::with_capacity(len_blocks.div_ceil(max) as usize);
    let mut at = lba;
    let end = lba.saturating_add(len_blocks);
    while at < end {
        let n = (end - at).min(max);
        out.push((at, n));
        at += n;
    }
    out
}

/// How WRITE_ZEROES (and TRIM) cover a byte range: partial blocks at the
/// edges (byte ranges inside one block each) and the whole blocks between.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ZeroPlan {
    /// `(lba, from_byte, to_byte)` within the block.
    pub head: Option<(u64, usize, usize)>,
    /// Whole blocks `(lba, len_blocks)`.
    pub middle: Option<(u64, u64)>,
    pub tail: Option<(u64, usize, usize)>,
}

impl ZeroPlan {
    pub fn new(offset: u64, len: u64) -> ZeroPlan {
        let bs = BLOCK_SIZE as u64;
        let end = offset.saturating_add(len);
        let mut p = ZeroPlan::default();
        if len == 0 {
            return p;
        }
        let first_full = offset.div_ceil(bs);
        let last_full = end / bs; // exclusive
        if first_full >= last_full && offset / bs == (end - 1) / bs {
            // Inside one block.
            if offset.is_multiple_of(bs) && end.is_multiple_of(bs) {
                p.middle = Some((offset / bs, 1));
            } else {
                let lba = offset / bs;
                p.head = Some((lba, (offset % bs) as usize, (end - lba * bs) as usize));
            }
            return p;
        }
        if !offset.is_multiple_of(bs) {
            p.head = Some((offset / bs, (offset % bs) as usize, BLOCK_SIZE));
        }
        if last_full > first_full {
            p.middle = Some((first_full, last_full - first_full));
        }
        if !end.is_multiple_of(bs) {
            p.tail = Some((end / bs, 0, (end % bs) as usize));
        }
        p
    }
}

/// The NBD error for an engine error.
pub fn errno_for(e: &sluice_engine::Error) -> u32 {
    use sluice_engine::Error as E;
    match e {
        E::ReadOnly { .. } => EPERM,
        E::OutOfRange { .. } | E::Invalid(_) | E::BadName { .. } | E::BadSize { .. } => EINVAL,
        E::NoSpace { .. } => ENOSPC,
        E::ShutDown => ESHUTDOWN,
        _ => EIO,
    }
}

fn be_u16(b: &[u8], at: usize) -> u16 {
    let mut a = [0u8; 2];
    a.copy_from_slice(&b[at..at + 2]);
    u16::from_be_bytes(a)
}

fn be_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed export table: the catalog the server builds from the engine,
    /// written down.
    struct Table(Vec<Export>);

    impl Catalog for Table {
        fn lookup(&mut self, name: &str) -> Result<Export, OptionRefusal> {
            self.0
                .iter()
                .find(|e| e.name == name)
                .cloned()
                .ok_or_else(|| OptionRefusal {
                    code: REP_ERR_UNKNOWN,
                    message: format!("no export named {name}"),
                })
        }
        fn list(&mut self) -> Result<Vec<String>, OptionRefusal> {
            Ok(self.0.iter().map(|e| e.name.clone()).collect())
        }
    }

    fn table() -> Table {
        Table(vec![
            Export {
                name: "v".into(),
                image: parse_export_name("v").unwrap(),
                size_bytes: 1 << 20,
                read_only: false,
            },
            Export {
                name: "v@s".into(),
                image: parse_export_name("v@s").unwrap(),
                size_bytes: 1 << 20,
                read_only: true,
            },
        ])
    }

    fn option_header(option: u32, len: u32) -> [u8; OPTION_HEADER_BYTES] {
        let mut b = [0u8; OPTION_HEADER_BYTES];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&len.to_be_bytes());
        b
    }

    fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
        let mut d = (name.len() as u32).to_be_bytes().to_vec();
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&(infos.len() as u16).to_be_bytes());
        for i in infos {
            d.extend_from_slice(&i.to_be_bytes());
        }
        d
    }

    /// Split a reply stream into (option, type, data) triples.
    fn replies(mut b: &[u8]) -> Vec<(u32, u32, Vec<u8>)> {
        let mut out = Vec::new();
        while !b.is_empty() {
            assert_eq!(be_u64(b, 0), OPTION_REPLY_MAGIC);
            let len = be_u32(b, 16) as usize;
            out.push((be_u32(b, 8), be_u32(b, 12), b[20..20 + len].to_vec()));
            b = &b[20 + len..];
        }
        out
    }

    fn request(flags: u16, command: u16, handle: u64, offset: u64, len: u32) -> [u8; 28] {
        let mut b = [0u8; 28];
        b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        b[4..6].copy_from_slice(&flags.to_be_bytes());
        b[6..8].copy_from_slice(&command.to_be_bytes());
        b[8..16].copy_from_slice(&handle.to_be_bytes());
        b[16..24].copy_from_slice(&offset.to_be_bytes());
        b[24..28].copy_from_slice(&len.to_be_bytes());
        b
    }

    const FLAGS: ClientFlags = ClientFlags { no_zeroes: true };

    #[test]
    fn greeting_golden_bytes() {
        assert_eq!(
            greeting(),
            [
                b'N', b'B', b'D', b'M', b'A', b'G', b'I', b'C', b'I', b'H', b'A', b'V', b'E', b'O',
                b'P', b'T', 0, 3
            ]
        );
    }

    #[test]
    fn client_flags() {
        assert_eq!(
            (parse_client_flags([0, 0, 0, 1])).ok(),
            Some(ClientFlags { no_zeroes: false })
        );
        assert_eq!(
            (parse_client_flags([0, 0, 0, 3])).ok(),
            Some(ClientFlags { no_zeroes: true })
        );
        // Not fixed newstyle, or unknown bits: refused.
        assert!(parse_client_flags([0, 0, 0, 0]).is_err());
        assert!(parse_client_flags([0, 0, 0, 2]).is_err());
        assert!(parse_client_flags([0, 0, 0, 5]).is_err());
        assert!(parse_client_flags([0x80, 0, 0, 1]).is_err());
    }

    #[test]
    fn option_header_magic_and_bound() {
        assert_eq!(
            parse_option_header(&option_header(OPT_GO, 10)).ok(),
            Some(OptionHeader {
                option: OPT_GO,
                len: 10
            })
        );
        assert_eq!(
            (parse_option_header(&option_header(OPT_GO, OPTION_DATA_MAX_BYTES)).map(|h| h.len))
                .ok(),
            Some(OPTION_DATA_MAX_BYTES)
        );
        assert!(matches!(
            parse_option_header(&option_header(OPT_GO, OPTION_DATA_MAX_BYTES + 1)),
            Err(NodeError::NbdOptionTooLong { .. })
        ));
        let mut b = option_header(OPT_GO, 0);
        b[0] ^= 1;
        assert!(matches!(
            parse_option_header(&b),
            Err(NodeError::NbdBadOptionMagic { .. })
        ));
    }

    #[test]
    fn option_parsing() {
        assert_eq!(
            parse_option(OPT_EXPORT_NAME, b"v/q"),
            OptionRequest::ExportName("v/q".into())
        );
        assert_eq!(parse_option(OPT_ABORT, b""), OptionRequest::Abort);
        assert_eq!(parse_option(OPT_LIST, b""), OptionRequest::List);
        assert!(matches!(
            parse_option(OPT_LIST, b"x"),
            OptionRequest::Invalid {
                option: OPT_LIST,
                ..
            }
        ));
        assert_eq!(
            parse_option(OPT_GO, &info_data("v", &[INFO_BLOCK_SIZE])),
            OptionRequest::Go(InfoRequest {
                name: "v".into(),
                infos: vec![INFO_BLOCK_SIZE]
            })
        );
        assert_eq!(
            parse_option(OPT_INFO, &info_data("", &[])),
            OptionRequest::Info(InfoRequest {
                name: "".into(),
                infos: vec![]
            })
        );
        for o in [
            0,
            4,
            OPT_STARTTLS,
            OPT_STRUCTURED_REPLY,
            9,
            10,
            11,
            u32::MAX,
        ] {
            assert_eq!(
                parse_option(o, b"abc"),
                OptionRequest::Unsupported { option: o }
            );
        }
    }

    #[test]
    fn info_request_errors() {
        let bad = |d: &[u8]| {
            matches!(
                parse_option(OPT_GO, d),
                OptionRequest::Invalid { option: OPT_GO, .. }
            )
        };
        assert!(bad(b""));
        assert!(bad(&[0, 0, 0, 0, 0]));
        // Name length beyond the data.
        assert!(bad(&[0, 0, 0, 9, b'v', 0, 0]));
        assert!(bad(&[0xff, 0xff, 0xff, 0xff, 0, 0]));
        // Info count that does not match the bytes.
        let mut d = info_data("v", &[1]);
        d.pop();
        assert!(bad(&d));
        let mut d = info_data("v", &[1]);
        d.push(0);
        assert!(bad(&d));
        // Too many info requests.
        assert!(bad(&info_data("v", &[0; INFO_REQUESTS_MAX + 1])));
        // Not UTF-8, NUL in the name, a name over the limit.
        assert!(bad(&info_data("\u{0}", &[])));
        let mut d = info_data("ab", &[]);
        d[4] = 0xff;
        assert!(bad(&d));
        assert!(bad(&info_data(&"x".repeat(NAME_MAX_BYTES + 1), &[])));
        assert!(!bad(&info_data(&"x".repeat(NAME_MAX_BYTES), &[])));
    }

    #[test]
    fn export_names() {
        let img = |v: &str, q: Option<&str>, s: Option<&str>| Image {
            ns: NsName {
                volume: v.into(),
                qtree: q.map(Into::into),
            },
            snapshot: s.map(Into::into),
        };
        assert_eq!(parse_export_name("v"), Ok(img("v", None, None)));
        assert_eq!(parse_export_name("v/q"), Ok(img("v", Some("q"), None)));
        assert_eq!(parse_export_name("v@s"), Ok(img("v", None, Some("s"))));
        assert_eq!(
            (parse_export_name("v/q@s")).ok(),
            Some(img("v", Some("q"), Some("s")))
        );
        for bad in [
            "", "/q", "v/", "@s", "v@", "v/q/r", "v@s@t", "v@s/q", "v//q", "v/@s",
        ] {
            assert!(parse_export_name(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn negotiate_go_sends_export_and_block_size() {
        let mut out = Vec::new();
        let req = parse_option(OPT_GO, &info_data("v", &[INFO_NAME, INFO_DESCRIPTION]));
        let step = negotiate(&req, FLAGS, &mut table(), &mut out).unwrap();
        assert!(matches!(step, Step::Transmit(ref e) if e.name == "v" && !e.read_only));
        let r = replies(&out);
        assert_eq!(r.len(), 5);
        assert!(r.iter().all(|(o, _, _)| *o == OPT_GO));
        assert_eq!(r[0].1, REP_INFO);
        let mut export = INFO_EXPORT.to_be_bytes().to_vec();
        export.extend_from_slice(&(1u64 << 20).to_be_bytes());
        let flags = TFLAG_HAS_FLAGS
            | TFLAG_SEND_FLUSH
            | TFLAG_SEND_FUA
            | TFLAG_SEND_TRIM
            | TFLAG_SEND_WRITE_ZEROES
            | TFLAG_CAN_MULTI_CONN;
        export.extend_from_slice(&flags.to_be_bytes());
        assert_eq!(r[0].2, export);
        assert_eq!(
            r[1].2,
            [0, 3, 0, 0, 0, 1, 0, 0, 0x10, 0, 0x02, 0, 0, 0].to_vec()
        );
        assert_eq!(r[2].2, [&[0u8, 1][..], b"v"].concat());
        assert_eq!(be_u16(&r[3].2, 0), INFO_DESCRIPTION);
        assert_eq!(r[4], (OPT_GO, REP_ACK, vec![]));
    }

    #[test]
    fn negotiate_info_continues_and_snapshot_is_read_only() {
        let mut out = Vec::new();
        let req = parse_option(OPT_INFO, &info_data("v@s", &[]));
        assert_eq!(
            (negotiate(&req, FLAGS, &mut table(), &mut out)).ok(),
            Some(Step::Continue)
        );
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        let flags = be_u16(&r[0].2, 10);
        assert_ne!(flags & TFLAG_READ_ONLY, 0);
        assert_eq!(flags & (TFLAG_SEND_TRIM | TFLAG_SEND_WRITE_ZEROES), 0);
        assert_eq!(r[2].1, REP_ACK);
    }

    #[test]
    fn negotiate_unknown_export() {
        let mut out = Vec::new();
        let req = parse_option(OPT_GO, &info_data("nope", &[]));
        assert_eq!(
            (negotiate(&req, FLAGS, &mut table(), &mut out)).ok(),
            Some(Step::Continue)
        );
        let r = replies(&out);
        assert_eq!(r.len(), 1);
        assert_eq!(r[0].1, REP_ERR_UNKNOWN);
        assert_eq!(r[0].2, b"no export named nope");
        // EXPORT_NAME cannot report it: the session ends.
        let req = OptionRequest::ExportName("nope".into());
        assert!(matches!(
            negotiate(&req, FLAGS, &mut table(), &mut Vec::new()),
            Err(NodeError::NbdExportNameUnknown { .. })
        ));
    }

    #[test]
    fn negotiate_export_name_zeroes() {
        for (no_zeroes, len) in [(false, 8 + 2 + 124), (true, 10)] {
            let mut out = Vec::new();
            let step = negotiate(
                &OptionRequest::ExportName("v".into()),
                ClientFlags { no_zeroes },
                &mut table(),
                &mut out,
            )
            .unwrap();
            assert!(matches!(step, Step::Transmit(_)));
            assert_eq!(out.len(), len);
            assert_eq!(be_u64(&out, 0), 1 << 20);
        }
    }

    #[test]
    fn negotiate_list_abort_unsupported_invalid() {
        let mut out = Vec::new();
        assert_eq!(
            (negotiate(&OptionRequest::List, FLAGS, &mut table(), &mut out)).ok(),
            Some(Step::Continue)
        );
        let r = replies(&out);
        assert_eq!(r.len(), 3);
        assert_eq!(
            r[0],
            (OPT_LIST, REP_SERVER, [&[0u8, 0, 0, 1][..], b"v"].concat())
        );
        assert_eq!(r[1].2, [&[0u8, 0, 0, 3][..], b"v@s"].concat());
        assert_eq!(r[2].1, REP_ACK);

        let mut out = Vec::new();
        assert_eq!(
            (negotiate(&OptionRequest::Abort, FLAGS, &mut table(), &mut out)).ok(),
            Some(Step::Close)
        );
        assert_eq!(replies(&out), vec![(OPT_ABORT, REP_ACK, vec![])]);

        let mut out = Vec::new();
        let req = parse_option(OPT_STRUCTURED_REPLY, b"");
        assert_eq!(
            (negotiate(&req, FLAGS, &mut table(), &mut out)).ok(),
            Some(Step::Continue)
        );
        assert_eq!(replies(&out)[0].1, REP_ERR_UNSUP);

        let mut out = Vec::new();
        let req = parse_option(OPT_LIST, b"junk");
        negotiate(&req, FLAGS, &mut table(), &mut out).unwrap();
        assert_eq!(replies(&out)[0].1, REP_ERR_INVALID);
    }

    #[test]
    fn option_error_message_is_bounded() {
        let mut out = Vec::new();
        encode_option_error(&mut out, 1, REP_ERR_UNKNOWN, &"e".repeat(10_000));
        assert_eq!(replies(&out)[0].2.len(), NAME_MAX_BYTES);
        // Multi-byte characters are not cut in half.
        let mut out = Vec::new();
        encode_option_error(
            &mut out,
            1,
            REP_ERR_UNKNOWN,
            &format!("e{}", "é".repeat(5000)),
        );
        let m = &replies(&out)[0].2;
        assert_eq!(m.len(), NAME_MAX_BYTES - 1);
        assert!(std::str::from_utf8(m).is_ok());
    }

    #[test]
    fn request_header_parsing() {
        let h = parse_request_header(&request(CMD_FLAG_FUA, CMD_WRITE, 7, 4096, 512)).unwrap();
        assert_eq!(
            h,
            RequestHeader {
                flags: CMD_FLAG_FUA,
                command: CMD_WRITE,
                handle: 7,
                offset: 4096,
                len: 512
            }
        );
        assert_eq!(h.payload_bytes(), 512);
        let r = parse_request_header(&request(0, CMD_READ, 1, 0, PAYLOAD_MAX_BYTES)).unwrap();
        assert_eq!(r.payload_bytes(), 0);

        let mut bad = request(0, CMD_READ, 1, 0, 1);
        bad[3] ^= 0xff;
        assert!(matches!(
            parse_request_header(&bad),
            Err(NodeError::NbdBadRequestMagic { .. })
        ));
        for c in [CMD_RESIZE + 1, 100, u16::MAX] {
            assert!(matches!(
                parse_request_header(&request(0, c, 1, 0, 0)),
                Err(NodeError::NbdUnknownCommand { command }) if command == c
            ));
        }
        for c in [CMD_READ, CMD_WRITE] {
            assert!(matches!(
                parse_request_header(&request(0, c, 1, 0, PAYLOAD_MAX_BYTES + 1)),
                Err(NodeError::NbdPayloadTooLong { .. })
            ));
        }
        // Trim and write-zeroes lengths are not payloads: any u32 is fine.
        for c in [CMD_TRIM, CMD_WRITE_ZEROES] {
            assert!(parse_request_header(&request(0, c, 1, 0, u32::MAX)).is_ok());
        }
    }

    #[test]
    fn validation() {
        let t = table();
        let (rw, ro) = (&t.0[0], &t.0[1]);
        let v = |flags, cmd, off, len, e: &Export| {
            validate(
                &parse_request_header(&request(flags, cmd, 9, off, len)).unwrap(),
                e,
            )
        };
        assert_eq!(
            v(0, CMD_READ, 0, 1 << 20, rw),
            Ok(Command::Read {
                offset: 0,
                len: 1 << 20
            })
        );
        assert_eq!(
            v(CMD_FLAG_FUA, CMD_WRITE, 100, 10, rw),
            Ok(Command::Write {
                offset: 100,
                len: 10,
                fua: true
            })
        );
        assert_eq!(
            v(CMD_FLAG_NO_HOLE, CMD_WRITE_ZEROES, 0, 10, rw),
            Ok(Command::WriteZeroes {
                offset: 0,
                len: 10,
                fua: false
            })
        );
        assert_eq!(v(0, CMD_FLUSH, 0, 0, rw), Ok(Command::Flush));
        assert_eq!(v(0, CMD_DISC, 0, 0, rw), Ok(Command::Disc));
        // Zero-length at the very end is in range.
        assert!(v(0, CMD_READ, 1 << 20, 0, rw).is_ok());
        // Out of range, overflowing.
        assert_eq!(v(0, CMD_READ, 1 << 20, 1, rw), Err(EINVAL));
        assert_eq!(v(0, CMD_WRITE, (1 << 20) - 1, 2, rw), Err(EINVAL));
        assert_eq!(v(0, CMD_TRIM, u64::MAX, 2, rw), Err(EINVAL));
        // Flags a command may not carry.
        assert_eq!(v(CMD_FLAG_NO_HOLE, CMD_WRITE, 0, 1, rw), Err(EINVAL));
        assert_eq!(v(1 << 2, CMD_READ, 0, 1, rw), Err(EINVAL));
        assert_eq!(v(1 << 15, CMD_FLUSH, 0, 0, rw), Err(EINVAL));
        // Read-only: every kind of write is EPERM, reads and flushes work.
        assert_eq!(v(0, CMD_WRITE, 0, 1, ro), Err(EPERM));
        assert_eq!(v(0, CMD_TRIM, 0, 1, ro), Err(EPERM));
        assert_eq!(v(0, CMD_WRITE_ZEROES, 0, 1, ro), Err(EPERM));
        assert!(v(0, CMD_READ, 0, 1, ro).is_ok());
        assert!(v(0, CMD_FLUSH, 0, 0, ro).is_ok());
        // Known commands never advertised.
        for c in [CMD_CACHE, CMD_BLOCK_STATUS, CMD_RESIZE] {
            assert_eq!(v(0, c, 0, 1, rw), Err(EINVAL));
        }
    }

    #[test]
    fn simple_reply_golden_bytes() {
        assert_eq!(
            encode_simple_reply(EIO, 0x0102_0304_0506_0708),
            [0x67, 0x44, 0x66, 0x98, 0, 0, 0, 5, 1, 2, 3, 4, 5, 6, 7, 8]
        );
    }

    #[test]
    fn spans_and_splits() {
        assert_eq!(
            Span::covering(0, 4096),
            Span {
                lba: 0,
                len_blocks: 1,
                head_bytes: 0
            }
        );
        assert_eq!(
            Span::covering(4095, 2),
            Span {
                lba: 0,
                len_blocks: 2,
                head_bytes: 4095
            }
        );
        assert_eq!(
            Span::covering(8192 + 5, 4096),
            Span {
                lba: 2,
                len_blocks: 2,
                head_bytes: 5
            }
        );
        assert!(Span::aligned(8192, 4096));
        assert!(!Span::aligned(8192, 4095));
        assert!(!Span::aligned(1, 4096));
        assert_eq!(split(10, 5, 2), vec![(10, 2), (12, 2), (14, 1)]);
        assert_eq!(split(0, 4, 4), vec![(0, 4)]);
        assert_eq!(split(0, 0, 4), vec![]);
        assert_eq!(split(0, 3, 0), vec![(0, 1), (1, 1), (2, 1)]);
    }

    #[test]
    fn zero_plans() {
        let bs = BLOCK_SIZE as u64;
        assert_eq!(ZeroPlan::new(0, 0), ZeroPlan::default());
        assert_eq!(
            ZeroPlan::new(0, bs),
            ZeroPlan {
                middle: Some((0, 1)),
                ..ZeroPlan::default()
            }
        );
        assert_eq!(
            ZeroPlan::new(100, 50),
            ZeroPlan {
                head: Some((0, 100, 150)),
                ..ZeroPlan::default()
            }
        );
        assert_eq!(
            ZeroPlan::new(4000, 200),
            ZeroPlan {
                head: Some((0, 4000, 4096)),
                middle: None,
                tail: Some((1, 0, 104)),
            }
        );
        assert_eq!(
            ZeroPlan::new(10, 3 * bs),
            ZeroPlan {
                head: Some((0, 10, 4096)),
                middle: Some((1, 2)),
                tail: Some((3, 0, 10)),
            }
        );
        // Every byte of the range is covered exactly once, nothing else.
        let mut seed = 0x9e37_79b9_7f4a_7c15u64;
        for _ in 0..2000 {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            let off = seed % (6 * bs);
            let len = (seed >> 20) % (4 * bs);
            let p = ZeroPlan::new(off, len);
            let mut covered = vec![0u8; (12 * bs) as usize];
            for (lba, from, to) in [p.head, p.tail].into_iter().flatten() {
                assert!(from < to && to <= BLOCK_SIZE);
                for b in &mut covered[(lba * bs) as usize + from..(lba * bs) as usize + to] {
                    *b += 1;
                }
            }
            if let Some((lba, n)) = p.middle {
                for b in &mut covered[(lba * bs) as usize..((lba + n) * bs) as usize] {
                    *b += 1;
                }
            }
            for (i, c) in covered.iter().enumerate() {
                let inside = (i as u64) >= off && (i as u64) < off + len;
                assert_eq!(*c, inside as u8, "off {off} len {len} byte {i}");
            }
        }
    }

    #[test]
    fn engine_errors_map_to_errno() {
        use sluice_engine::Error as E;
        assert_eq!(
            errno_for(&E::ReadOnly {
                what: "qtree",
                name: "v/q".into()
            }),
            EPERM
        );
        assert_eq!(
            errno_for(&E::OutOfRange {
                ns: "v".into(),
                lba: 1,
                len: 1,
                size: 1
            }),
            EINVAL
        );
        assert_eq!(errno_for(&E::NoSpace { needed: 1, free: 0 }), ENOSPC);
        assert_eq!(errno_for(&E::ShutDown), ESHUTDOWN);
        assert_eq!(
            errno_for(&E::Poisoned {
                reason: "flush".into()
            }),
            EIO
        );
        assert_eq!(
            errno_for(&E::DataChecksum {
                vol: "v".into(),
                lba: 1,
                pba: 2
            }),
            EIO
        );
    }

    #[test]
    fn parsers_never_panic_on_garbage() {
        let mut seed = 0x0123_4567_89ab_cdefu64;
        let mut next = || {
            seed ^= seed << 13;
            seed ^= seed >> 7;
            seed ^= seed << 17;
            seed
        };
        for _ in 0..20_000 {
            let n = (next() % 64) as usize;
            let data: Vec<u8> = (0..n).map(|_| next() as u8).collect();
            let opt = (next() % 12) as u32;
            let req = parse_option(opt, &data);
            let _ = negotiate(&req, FLAGS, &mut table(), &mut Vec::new());
            let mut h = [0u8; 28];
            h.iter_mut().for_each(|b| *b = next() as u8);
            if next() % 2 == 0 {
                h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
            }
            if let Ok(h) = parse_request_header(&h) {
                let _ = validate(&h, &table().0[0]);
            }
        }
    }
}
