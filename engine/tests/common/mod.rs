//! What the randomized engine tests share: the test kit's seeded generator
//! with the two draws the tests use (the seed comes from
//! `sluice_testkit::seed`: `SLUICE_SEED` replays a run); and `downgrade`,
//! which makes a pool look as an older format wrote it. Not every test file
//! uses every item.
#![allow(dead_code)]

use sluice_engine::api::Request;

/// `sluice_testkit::rng`'s generator, the same sequence for the same seed
/// everywhere.
pub struct Rng(pub rand::rngs::SmallRng);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(sluice_testkit::rng(seed))
    }

    pub fn next(&mut self) -> u64 {
        rand::RngCore::next_u64(&mut self.0)
    }

    /// Uniform in `0..n`; 0 when `n` is 0.
    pub fn below(&mut self, n: u64) -> u64 {
        rand::Rng::gen_range(&mut self.0, 0..n.max(1))
    }
}

/// Make the pool on `dev` look as a build of format `version` (1 to 4)
/// left it: the newest catalog log replayed into the one blob of format 4
/// ([`blob_of_log`]), then without the origin tag after each volume for
/// versions 1 to 3 (format 4 added it; the pool must have no clone),
/// without the flags byte after each live namespace for versions 1 and 2
/// (format 3 added it), written as a one-block chain at the log's head
/// block; and both superblock slots with the old version (version 1:
/// nothing after `volumes_max`). The older slot's catalog is left alone:
/// the newer slot wins at mount, so it is not read. For pools whose
/// catalog blob fits one block.
pub fn downgrade(
    dev: &mut sluice_engine::device::sim::SimDevice,
    sim: &sluice_engine::device::sim::SimHandle,
    version: u32,
) {
    use sluice_engine::format::*;
    assert!((1..=4).contains(&version), "downgrade to {version}");
    let slots: Vec<Option<Superblock>> = (0..2u64)
        .map(|s| Superblock::decode(&sim.read_durable(s), s).expect("superblock"))
        .collect();
    let newest = slots
        .iter()
        .flatten()
        .max_by_key(|sb| sb.gen)
        .expect("a superblock")
        .clone();
    let at = newest.catalog;
    let mut pieces = Vec::new();
    let mut ptr = at;
    while ptr.pba != 0 {
        let raw = sim.read_durable(ptr.pba);
        let payload = decode_block(&raw, ptr, KIND_CATALOG_LOG, 0).expect("catalog log block");
        let mut r = Reader::new(payload, ptr.pba, "catalog");
        let prev = r.ptr().expect("prev");
        let len = r.u32().expect("len") as usize;
        pieces.push(r.take(len).expect("piece").to_vec());
        ptr = prev;
    }
    pieces.reverse();
    let blob = blob_of_log(&pieces.concat());
    let blob = if version == 4 {
        blob
    } else {
        catalog_of_version(&blob, version)
    };
    let mut w = Writer::default();
    w.ptr(Ptr::default());
    w.u32(blob.len() as u32);
    w.bytes(&blob);
    assert!(w.buf.len() <= PAYLOAD, "catalog of one block");
    write_block(
        dev,
        at.pba,
        encode_block(KIND_CATALOG, 0, at.pba, at.birth, &w.buf),
    );
    for (slot, sb) in slots.into_iter().enumerate() {
        let Some(mut sb) = sb else { continue };
        sb.version = version;
        let mut b = sb.encode();
        if version == 1 {
            b[68..4092].fill(0);
            let crc = crc32c::crc32c(&b[..4092]);
            b[4092..].copy_from_slice(&crc.to_le_bytes());
        }
        write_block(dev, slot as u64, b);
    }
}

/// Replay a format-5 catalog log (docs/FORMAT.md, "Catalog") into the
/// format-4 blob of the same catalog: the test's own reading of the byte
/// tables, field by field.
fn blob_of_log(stream: &[u8]) -> Vec<u8> {
    use sluice_engine::format::{Reader, Writer};
    struct V {
        id: u32,
        head: Vec<u8>,
        origin: Vec<u8>,
        snaps: Vec<([u8; 16], Vec<u8>)>,
    }
    fn skip_str(r: &mut Reader) {
        let n = r.u32().expect("length") as usize;
        r.take(n).expect("string");
    }
    let mut next_id = 0u32;
    let mut vols: Vec<V> = Vec::new();
    let mut attrs: std::collections::BTreeMap<Vec<u8>, Vec<u8>> = Default::default();
    // Field walks report how many bytes a record's body took, so the body
    // can be copied whole.
    let mut pos = 0usize;
    while pos < stream.len() {
        let mut r = Reader::new(&stream[pos..], 0, "catalog");
        let tag = r.u8().expect("tag");
        let start = 1usize;
        match tag {
            1 => next_id = r.u32().expect("next id"),
            2 => {
                let id = r.u32().expect("id");
                skip_str(&mut r);
                r.take(1 + 8 + 16).expect("head");
                for _ in 0..r.u32().expect("namespaces") {
                    skip_str(&mut r);
                    r.take(8 + 16 + 16 + 1).expect("namespace");
                }
                let head_end = consumed(&stream[pos..], &r);
                let head = stream[pos + start..pos + head_end].to_vec();
                let o = r.u8().expect("origin");
                if o == 1 {
                    r.take(20).expect("origin body");
                }
                let origin = stream[pos + head_end..pos + consumed(&stream[pos..], &r)].to_vec();
                match vols.iter_mut().find(|v| v.id == id) {
                    Some(v) => {
                        v.head = head;
                        v.origin = origin;
                    }
                    None => vols.push(V {
                        id,
                        head,
                        origin,
                        snaps: Vec::new(),
                    }),
                }
            }
            3 => {
                let id = r.u32().expect("id");
                vols.retain(|v| v.id != id);
            }
            4 => {
                let id = r.u32().expect("volume id");
                let body_at = consumed(&stream[pos..], &r);
                let uuid: [u8; 16] = r.take(16).expect("uuid").try_into().expect("16");
                skip_str(&mut r);
                r.take(24 + 16).expect("snapshot");
                for _ in 0..r.u32().expect("namespaces") {
                    skip_str(&mut r);
                    r.take(16 + 16).expect("namespace");
                }
                let body = stream[pos + body_at..pos + consumed(&stream[pos..], &r)].to_vec();
                let v = vols
                    .iter_mut()
                    .find(|v| v.id == id)
                    .expect("snapshot's volume");
                v.snaps.push((uuid, body));
            }
            5 => {
                let id = r.u32().expect("volume id");
                let uuid: [u8; 16] = r.take(16).expect("uuid").try_into().expect("16");
                let v = vols
                    .iter_mut()
                    .find(|v| v.id == id)
                    .expect("snapshot's volume");
                v.snaps.retain(|(u, _)| *u != uuid);
            }
            6 => {
                let k = r.blob().expect("key");
                let v = r.blob().expect("value");
                attrs.insert(k, v);
            }
            7 => {
                let k = r.blob().expect("key");
                attrs.remove(&k);
            }
            other => panic!("unknown catalog record {other}"),
        }
        pos += consumed(&stream[pos..], &r);
    }
    let mut w = Writer::default();
    w.u32(next_id);
    w.u32(vols.len() as u32);
    for v in &vols {
        w.bytes(&v.head);
        w.u32(v.snaps.len() as u32);
        for (_, b) in &v.snaps {
            w.bytes(b);
        }
        w.bytes(&v.origin);
    }
    w.u32(attrs.len() as u32);
    for (k, v) in &attrs {
        w.blob(k);
        w.blob(v);
    }
    w.buf
}

/// Bytes of `b` that reader `r` (made over `b`) has read.
fn consumed(b: &[u8], r: &sluice_engine::format::Reader) -> usize {
    b.len() - r.remaining()
}

/// A format-4 catalog blob (docs/FORMAT.md) as format `version` encodes
/// it: without the per-volume origin (formats 1 to 3; the pool must have
/// no clone) and without the namespace flags (formats 1 and 2).
fn catalog_of_version(blob: &[u8], version: u32) -> Vec<u8> {
    use sluice_engine::format::{Reader, Writer};
    let mut r = Reader::new(blob, 0, "catalog");
    let mut w = Writer::default();
    fn raw(r: &mut Reader, w: &mut Writer, n: usize) {
        w.bytes(r.take(n).expect("catalog field"));
    }
    fn count(r: &mut Reader, w: &mut Writer) -> u32 {
        let n = r.u32().expect("catalog count");
        w.u32(n);
        n
    }
    fn str(r: &mut Reader, w: &mut Writer) {
        let n = count(r, w);
        raw(r, w, n as usize);
    }
    raw(&mut r, &mut w, 4); // next_volume_id
    for _ in 0..count(&mut r, &mut w) {
        raw(&mut r, &mut w, 4); // id
        str(&mut r, &mut w);
        raw(&mut r, &mut w, 1 + 8 + 16); // read_only, live_used_blocks, plane
        for _ in 0..count(&mut r, &mut w) {
            str(&mut r, &mut w);
            raw(&mut r, &mut w, 8 + 16 + 16); // size, map root, digest
            let flags = r.u8().expect("namespace flags");
            if version >= 3 {
                w.u8(flags);
            }
        }
        for _ in 0..count(&mut r, &mut w) {
            raw(&mut r, &mut w, 16); // uuid
            str(&mut r, &mut w);
            raw(&mut r, &mut w, 8 * 3 + 16); // gen, created, referenced, plane
            for _ in 0..count(&mut r, &mut w) {
                str(&mut r, &mut w);
                raw(&mut r, &mut w, 16 + 16); // map root, digest
            }
        }
        // Not in formats 1 to 3, which have no clones.
        assert_eq!(
            r.u8().expect("origin tag"),
            0,
            "a clone cannot be downgraded"
        );
    }
    for _ in 0..count(&mut r, &mut w) {
        str(&mut r, &mut w); // key
        str(&mut r, &mut w); // value
    }
    assert!(r.take(1).is_err(), "catalog has trailing bytes");
    w.buf
}

fn write_block(dev: &mut sluice_engine::device::sim::SimDevice, pba: u64, b: Vec<u8>) {
    use sluice_engine::device::{AlignedBuf, IoKind, IoRequest};
    let mut buf = AlignedBuf::zeroed(1);
    buf.as_mut_slice().copy_from_slice(&b);
    let c = sluice_engine::device::sim::run_one(
        dev,
        IoRequest {
            tag: pba,
            kind: IoKind::Write { fua: true },
            pba,
            buf: Some(buf),
        },
    )
    .expect("device");
    c.result.expect("block write");
}

/// A copy of a request of the crash workloads (requests are not `Clone`:
/// a write owns its buffer).
pub fn clone_req(r: &Request) -> Request {
    match r {
        Request::Write {
            ns,
            lba,
            data,
            fua,
            replica,
        } => Request::Write {
            ns: ns.clone(),
            lba: *lba,
            data: data.clone(),
            fua: *fua,
            replica: *replica,
        },
        Request::Trim {
            ns,
            lba,
            len_blocks,
            replica,
        } => Request::Trim {
            ns: ns.clone(),
            lba: *lba,
            len_blocks: *len_blocks,
            replica: *replica,
        },
        Request::Flush => Request::Flush,
        Request::CreateSnapshot {
            volume,
            name,
            id,
            created_unix_ms,
        } => Request::CreateSnapshot {
            volume: volume.clone(),
            name: name.clone(),
            id: *id,
            created_unix_ms: *created_unix_ms,
        },
        Request::DeleteSnapshot { volume, name } => Request::DeleteSnapshot {
            volume: volume.clone(),
            name: name.clone(),
        },
        Request::SetReadOnly { ns, read_only } => Request::SetReadOnly {
            ns: ns.clone(),
            read_only: *read_only,
        },
        Request::Rollback {
            volume,
            snapshot,
            destroy_newer,
        } => Request::Rollback {
            volume: volume.clone(),
            snapshot: snapshot.clone(),
            destroy_newer: *destroy_newer,
        },
        Request::CreateVolume { name, size_bytes } => Request::CreateVolume {
            name: name.clone(),
            size_bytes: *size_bytes,
        },
        Request::SetAttr { key, value } => Request::SetAttr {
            key: key.clone(),
            value: value.clone(),
        },
        other => panic!("not a crash-workload request: {other:?}"),
    }
}
