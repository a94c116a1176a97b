//! The translation format: round trips of arbitrary valid sets, robustness of
//! `decode` on arbitrary and mutated input, and one test per rejection reason.

use avex_core::format::{
    check_against, decode, encode, validate, validate_set, ClusterError, FormatError,
    GuestIdentity, Rejection, TranslationSet, TranslatorStamp, FIXED_HEADER_LEN, MAGIC,
    MAX_CLUSTERS, MAX_CLUSTER_BYTES, VERSION,
};
use avex_core::identity::of_segments;
use avex_core::ir::*;
use avex_core::policy::ExitClass;
use proptest::prelude::*;
use proptest::sample::select;
use sha2::{Digest, Sha256};

// ---------------------------------------------------------------------------------
// Strategies for valid clusters
// ---------------------------------------------------------------------------------

fn nregs(b: Bitness) -> u8 {
    if b == Bitness::B64 {
        16
    } else {
        8
    }
}

fn sizes(b: Bitness) -> Vec<Size> {
    if b == Bitness::B64 {
        vec![Size::S1, Size::S2, Size::S4, Size::S8]
    } else {
        vec![Size::S1, Size::S2, Size::S4]
    }
}

fn wide_sizes(b: Bitness) -> Vec<Size> {
    sizes(b).into_iter().filter(|s| *s != Size::S1).collect()
}

fn addr_sizes(b: Bitness) -> Vec<Size> {
    match b {
        Bitness::B64 => vec![Size::S4, Size::S8],
        _ => vec![Size::S2, Size::S4],
    }
}

fn seg() -> impl Strategy<Value = Seg> {
    select(vec![Seg::Es, Seg::Cs, Seg::Ss, Seg::Ds, Seg::Fs, Seg::Gs])
}

fn cond() -> impl Strategy<Value = Cond> {
    use Cond::*;
    select(vec![O, No, B, Ae, E, Ne, Be, A, S, Ns, P, Np, L, Ge, Le, G])
}

fn reg(b: Bitness, size: Size) -> BoxedStrategy<RegRef> {
    (0..nregs(b), any::<bool>())
        .prop_map(move |(index, h)| RegRef {
            index,
            size,
            high8: h && size == Size::S1 && index < 4,
        })
        .boxed()
}

fn mem(b: Bitness) -> BoxedStrategy<MemRef> {
    (
        seg(),
        proptest::option::of(0..nregs(b)),
        proptest::option::of(0..nregs(b)),
        select(vec![1u8, 2, 4, 8]),
        any::<i64>(),
        select(addr_sizes(b)),
    )
        .prop_map(|(seg, base, index, scale, disp, addr_size)| MemRef {
            seg,
            base,
            index,
            scale,
            disp,
            addr_size,
        })
        .boxed()
}

fn rm(b: Bitness, size: Size) -> BoxedStrategy<Operand> {
    prop_oneof![
        reg(b, size).prop_map(Operand::Reg),
        mem(b).prop_map(Operand::Mem)
    ]
    .boxed()
}

fn rmi(b: Bitness, size: Size) -> BoxedStrategy<Operand> {
    prop_oneof![rm(b, size), any::<u64>().prop_map(Operand::Imm)].boxed()
}

/// dst, src of one width, never two memory operands.
fn dst_src(b: Bitness, size: Size) -> BoxedStrategy<(Operand, Operand)> {
    prop_oneof![
        (reg(b, size).prop_map(Operand::Reg), rmi(b, size)),
        (
            mem(b).prop_map(Operand::Mem),
            reg(b, size).prop_map(Operand::Reg)
        ),
        (
            mem(b).prop_map(Operand::Mem),
            any::<u64>().prop_map(Operand::Imm)
        ),
    ]
    .boxed()
}

fn target() -> BoxedStrategy<Target> {
    // Insn indices are reduced into range later.
    prop_oneof![
        any::<u16>().prop_map(Target::Insn),
        any::<u64>().prop_map(Target::Exit)
    ]
    .boxed()
}

fn io_size() -> impl Strategy<Value = Size> {
    select(vec![Size::S1, Size::S2, Size::S4])
}

fn port() -> impl Strategy<Value = PortSrc> {
    prop_oneof![any::<u8>().prop_map(PortSrc::Imm), Just(PortSrc::Dx)]
}

/// An exiting op (with its class).
fn exiting_op(b: Bitness) -> BoxedStrategy<Op> {
    prop_oneof![
        (io_size(), port()).prop_map(|(size, port)| Op::In { size, port }),
        (io_size(), port()).prop_map(|(size, port)| Op::Out { size, port }),
        (io_size(), select(addr_sizes(b)), any::<bool>()).prop_map(|(size, addr_size, rep)| {
            Op::Ins {
                size,
                addr_size,
                rep,
            }
        }),
        (io_size(), select(addr_sizes(b)), any::<bool>(), seg()).prop_map(
            |(size, addr_size, rep, seg)| Op::Outs {
                size,
                addr_size,
                rep,
                seg
            }
        ),
        Just(Op::Rdmsr),
        Just(Op::Wrmsr),
        Just(Op::Cpuid),
        (select(vec![0u8, 3, 4, 8]), 0..nregs(b)).prop_map(|(cr, src)| Op::MovToCr { cr, src }),
        (select(vec![0u8, 3, 4, 8]), 0..nregs(b)).prop_map(|(cr, dst)| Op::MovFromCr { cr, dst }),
        Just(Op::Clts),
        rm(b, Size::S2).prop_map(|src| Op::Lmsw { src }),
        select(vec![
            Op::Rdtsc,
            Op::Rdtscp,
            Op::Rdpmc,
            Op::Xgetbv,
            Op::Xsetbv,
            Op::Wbinvd,
            Op::Invd,
            Op::Pause,
            Op::Hlt
        ]),
        mem(b).prop_map(|addr| Op::Invlpg { addr }),
    ]
    .boxed()
}

fn filler_op(b: Bitness) -> BoxedStrategy<Op> {
    let s = select(sizes(b));
    let ws = select(wide_sizes(b));
    let alu = select(vec![
        AluOp::Add,
        AluOp::Or,
        AluOp::Adc,
        AluOp::Sbb,
        AluOp::And,
        AluOp::Sub,
        AluOp::Xor,
        AluOp::Cmp,
        AluOp::Test,
    ]);
    let unary = select(vec![UnaryOp::Inc, UnaryOp::Dec, UnaryOp::Neg, UnaryOp::Not]);
    let shift = select(vec![
        ShiftOp::Rol,
        ShiftOp::Ror,
        ShiftOp::Rcl,
        ShiftOp::Rcr,
        ShiftOp::Shl,
        ShiftOp::Shr,
        ShiftOp::Sar,
    ]);
    let bit = select(vec![BitOp::Bt, BitOp::Bts, BitOp::Btr, BitOp::Btc]);
    let push_sizes = if b == Bitness::B64 {
        vec![Size::S2, Size::S8]
    } else {
        vec![Size::S2, Size::S4]
    };
    let cl = Operand::Reg(RegRef {
        index: RCX,
        size: Size::S1,
        high8: false,
    });
    prop_oneof![
        s.clone().prop_flat_map(
            move |size| dst_src(b, size).prop_map(move |(dst, src)| Op::Mov { size, dst, src })
        ),
        (ws.clone(), any::<bool>(), any::<bool>()).prop_flat_map(move |(dsz, sx, first)| {
            let src_size = if first || dsz == Size::S2 {
                Size::S1
            } else {
                Size::S2
            };
            (reg(b, dsz), rm(b, src_size)).prop_map(move |(mut dst, src)| {
                dst.high8 = false;
                if sx {
                    Op::Movsx { dst, src, src_size }
                } else {
                    Op::Movzx { dst, src, src_size }
                }
            })
        }),
        ws.clone().prop_flat_map(
            move |size| (reg(b, size), mem(b)).prop_map(|(dst, addr)| Op::Lea { dst, addr })
        ),
        (alu, s.clone()).prop_flat_map(move |(op, size)| dst_src(b, size)
            .prop_map(move |(dst, src)| Op::Alu { op, size, dst, src })),
        (unary, s.clone()).prop_flat_map(
            move |(op, size)| rm(b, size).prop_map(move |dst| Op::Unary { op, size, dst })
        ),
        (shift, s.clone(), any::<Option<u8>>()).prop_flat_map(move |(op, size, c)| {
            let count = c.map_or(cl, |c| Operand::Imm(c as u64));
            rm(b, size).prop_map(move |dst| Op::Shift {
                op,
                size,
                dst,
                count,
            })
        }),
        (bit, ws.clone()).prop_flat_map(move |(op, size)| (
            rm(b, size),
            prop_oneof![
                reg(b, size).prop_map(Operand::Reg),
                any::<u8>().prop_map(|i| Operand::Imm(i as u64))
            ]
        )
            .prop_map(move |(dst, bit)| Op::Bit { op, size, dst, bit })),
        s.clone().prop_flat_map(
            move |size| (reg(b, size), rm(b, size)).prop_map(move |(a, o)| Op::Xchg {
                size,
                a: Operand::Reg(a),
                b: o
            })
        ),
        select(push_sizes.clone())
            .prop_flat_map(move |size| rmi(b, size).prop_map(move |src| Op::Push { size, src })),
        select(push_sizes)
            .prop_flat_map(move |size| rm(b, size).prop_map(move |dst| Op::Pop { size, dst })),
        (cond(), rm(b, Size::S1)).prop_map(|(cond, dst)| Op::Setcc { cond, dst }),
        (cond(), ws.clone()).prop_flat_map(move |(cond, size)| (reg(b, size), rm(b, size))
            .prop_map(move |(mut dst, src)| {
                dst.high8 = false;
                Op::Cmovcc {
                    cond,
                    size,
                    dst,
                    src,
                }
            })),
        ws.clone().prop_map(|size| Op::SignExtendAcc { size }),
        ws.prop_map(|size| Op::SignExtendAccToDx { size }),
        select(vec![Op::Clc, Op::Stc, Op::Cmc, Op::Cld, Op::Std, Op::Nop]),
        target().prop_map(|target| Op::Jmp { target }),
        (cond(), target()).prop_map(|(cond, target)| Op::Jcc { cond, target }),
        (
            select(vec![
                LoopKind::Loop,
                LoopKind::Loope,
                LoopKind::Loopne,
                LoopKind::Jcxz
            ]),
            select(addr_sizes(b)),
            target()
        )
            .prop_map(|(kind, addr_size, target)| Op::Loop {
                kind,
                addr_size,
                target
            }),
        (0..nregs(b)).prop_map(|src| Op::MovToCr { cr: 2, src }),
    ]
    .boxed()
}

/// CALL rel, CALL r/m, JMP r/m and RET at the near-branch width of the code (their
/// return addresses are filled in once the instruction's address is known).
fn control_op(b: Bitness) -> BoxedStrategy<Op> {
    let size = if b == Bitness::B64 {
        select(vec![Size::S8])
    } else {
        select(vec![Size::S2, Size::S4])
    };
    prop_oneof![
        (size.clone(), target()).prop_map(|(size, target)| Op::Call {
            size,
            ret: 0,
            target
        }),
        size.clone().prop_flat_map(
            move |size| rm(b, size).prop_map(move |src| Op::CallIndirect { size, src, ret: 0 })
        ),
        size.clone().prop_flat_map(
            move |size| rm(b, size).prop_map(move |src| Op::JmpIndirect { size, src })
        ),
        (size, any::<u16>()).prop_map(|(size, pop)| Op::Ret { size, pop }),
    ]
    .boxed()
}

/// A guard record before it is tied to the cluster: which guarded instruction
/// (reduced modulo their number), and an instruction index (reduced modulo the
/// cluster's) or an exit address.
fn guard_spec() -> impl Strategy<Value = (u16, Result<u16, u64>)> {
    (
        any::<u16>(),
        prop_oneof![any::<u16>().prop_map(Ok), any::<u64>().prop_map(Err)],
    )
}

fn bitness() -> impl Strategy<Value = Bitness> {
    select(vec![Bitness::B16, Bitness::B32, Bitness::B64, Bitness::B64])
}

/// An arbitrary cluster that satisfies every rule of `format::validate`: a region
/// of one or more code ranges (instructions in address order, a gap starting a
/// new range), with calls, returns and guarded indirect branches.
fn cluster() -> BoxedStrategy<Cluster> {
    bitness()
        .prop_flat_map(|b| {
            let start_max: u64 = if b == Bitness::B64 {
                u64::MAX - 0x10000
            } else {
                0xffff_0000
            };
            (
                Just(b),
                0..start_max,
                exiting_op(b),
                proptest::collection::vec(
                    (
                        prop_oneof![3 => filler_op(b), 1 => exiting_op(b), 1 => control_op(b)],
                        any::<bool>(),
                        1u8..=15,
                        any::<Option<u16>>(),
                        prop_oneof![3 => Just(0u64), 1 => 1u64..0x400],
                    ),
                    0..12,
                ),
                1u8..=15,
                any::<u64>(),
                proptest::collection::vec(guard_spec(), 0..8),
            )
        })
        .prop_map(
            |(bitness, start, first, rest, first_len, seed, guard_specs)| {
                let mut insns = vec![Insn {
                    rip: start,
                    len: first_len,
                    exit_class: first.exit_class(),
                    op: first,
                }];
                let mut caps = vec![None];
                let mut ranges = vec![(start, start + first_len as u64)];
                for (op, classify, len, cap, gap) in rest {
                    let rip = insns.last().map(|i| i.rip + i.len as u64).unwrap() + gap;
                    let exit_class = if classify { op.exit_class() } else { None };
                    insns.push(Insn {
                        rip,
                        len,
                        op,
                        exit_class,
                    });
                    caps.push(cap);
                    let end = rip + len as u64;
                    match ranges.last_mut() {
                        Some(r) if gap == 0 => r.1 = end,
                        _ => ranges.push((rip, end)),
                    }
                }
                let n = insns.len();
                for insn in insns.iter_mut() {
                    let next = insn.rip + insn.len as u64;
                    if let Op::Call { size, ret, .. } | Op::CallIndirect { size, ret, .. } =
                        &mut insn.op
                    {
                        *ret = next & size.mask();
                    }
                }
                let mut back_edges = Vec::new();
                for (i, insn) in insns.iter_mut().enumerate() {
                    if let Some(Target::Insn(t)) = insn.op.target_mut() {
                        *t %= n as u16;
                        if (*t as usize) <= i {
                            back_edges.push(BackEdge {
                                insn: i as u16,
                                cap: caps[i],
                            });
                        }
                    }
                }
                let guarded: Vec<u16> = (0..n as u16)
                    .filter(|&i| insns[i as usize].op.is_guarded())
                    .collect();
                let mut guards = Vec::new();
                if !guarded.is_empty() {
                    for (which, to) in guard_specs {
                        let insn = guarded[which as usize % guarded.len()];
                        let (expect, target) = match to {
                            Ok(t) => {
                                let t = t % n as u16;
                                (insns[t as usize].rip, Target::Insn(t))
                            }
                            Err(a) => (a, Target::Exit(a)),
                        };
                        guards.push(Guard {
                            insn,
                            expect,
                            target,
                        });
                    }
                }
                guards.sort_by_key(|g| g.insn);
                for &i in &guarded {
                    let backward = guards
                        .iter()
                        .any(|g| g.insn == i && matches!(g.target, Target::Insn(t) if t <= i));
                    if backward {
                        back_edges.push(BackEdge {
                            insn: i,
                            cap: caps[i as usize],
                        });
                    }
                }
                back_edges.sort_by_key(|b| b.insn);
                // Every other guarded instruction as if inside a thunk entered from
                // a site of its own.
                let learn_sites = guarded
                    .iter()
                    .step_by(2)
                    .map(|&insn| LearnSite {
                        insn,
                        site: 0x5000 + u64::from(insn),
                    })
                    .collect();
                let mut x = seed;
                let code = ranges
                    .into_iter()
                    .map(|(start, end)| CodeRange {
                        start,
                        bytes: (start..end)
                            .map(|_| {
                                x = x
                                    .wrapping_mul(6364136223846793005)
                                    .wrapping_add(1442695040888963407);
                                (x >> 56) as u8
                            })
                            .collect(),
                    })
                    .collect();
                Cluster {
                    bitness,
                    code,
                    insns,
                    back_edges,
                    guards,
                    learn_sites,
                }
            },
        )
        .boxed()
}

fn set() -> BoxedStrategy<TranslationSet> {
    (
        any::<[u8; 32]>(),
        "[a-z0-9._-]{0,40}",
        any::<[u8; 32]>(),
        any::<[u8; 32]>(),
        ".{0,60}",
        proptest::collection::vec(cluster(), 0..6),
    )
        .prop_map(|(digest, name, policy, tfp, description, mut clusters)| {
            clusters.sort_by_key(|c| c.entry_rip());
            clusters.dedup_by_key(|c| c.entry_rip());
            TranslationSet {
                guest: GuestIdentity { digest, name },
                policy,
                translator: TranslatorStamp {
                    fingerprint: tfp,
                    description,
                },
                clusters,
            }
        })
        .boxed()
}

// ---------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------

const CHECKSUM_OFFSET: usize = 124;

/// Recompute the payload checksum after a change to the payload, so that tests
/// reach the checks behind it.
fn reseal(bytes: &mut [u8]) {
    if bytes.len() < FIXED_HEADER_LEN {
        return;
    }
    let header_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
    if header_len > bytes.len() {
        return;
    }
    let sum: [u8; 32] = Sha256::digest(&bytes[header_len..]).into();
    bytes[CHECKSUM_OFFSET..CHECKSUM_OFFSET + 32].copy_from_slice(&sum);
}

/// The payload of a set with these clusters, re-encoded with `f` applied first
/// (encode does not validate, so invalid clusters can be written).
fn encode_with(clusters: Vec<Cluster>) -> Vec<u8> {
    encode(&TranslationSet {
        guest: GuestIdentity {
            digest: [9; 32],
            name: "guest.elf".into(),
        },
        policy: [3; 32],
        translator: TranslatorStamp {
            fingerprint: [4; 32],
            description: "test".into(),
        },
        clusters,
    })
}

fn out_dx(rip: u64) -> Insn {
    Insn {
        rip,
        len: 1,
        op: Op::Out {
            size: Size::S1,
            port: PortSrc::Dx,
        },
        exit_class: Some(ExitClass::Out),
    }
}

/// `out dx, al; in al, dx; jmp back to 0; out dx, al` at `start`.
fn good(start: u64) -> Cluster {
    Cluster::contiguous(
        Bitness::B64,
        start,
        vec![0xee, 0xec, 0xeb, 0xfb, 0xee],
        vec![
            out_dx(start),
            Insn {
                rip: start + 1,
                len: 1,
                op: Op::In {
                    size: Size::S1,
                    port: PortSrc::Dx,
                },
                exit_class: Some(ExitClass::In),
            },
            Insn {
                rip: start + 2,
                len: 2,
                op: Op::Jmp {
                    target: Target::Insn(0),
                },
                exit_class: None,
            },
            out_dx(start + 4),
        ],
        vec![BackEdge {
            insn: 2,
            cap: Some(10),
        }],
    )
}

fn good_set() -> TranslationSet {
    TranslationSet {
        guest: GuestIdentity {
            digest: [9; 32],
            name: "guest.elf".into(),
        },
        policy: [3; 32],
        translator: TranslatorStamp {
            fingerprint: [4; 32],
            description: "test".into(),
        },
        clusters: vec![good(0x1000), good(0x2000)],
    }
}

fn cluster_error(c: Cluster) -> ClusterError {
    match decode(&encode_with(vec![c])) {
        Err(FormatError::ClusterInvalid {
            cluster: 0, error, ..
        }) => error,
        other => panic!("expected ClusterInvalid, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------------
// Properties
// ---------------------------------------------------------------------------------

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn generated_clusters_are_valid(c in cluster()) {
        prop_assert_eq!(validate(&c), Ok(()));
    }

    #[test]
    fn round_trip(s in set()) {
        let bytes = encode(&s);
        let back = decode(&bytes).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(&back, &s);
        prop_assert_eq!(encode(&back), bytes);
    }

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        if let Ok(s) = decode(&bytes) {
            prop_assert_eq!(validate_set(&s), Ok(()));
        }
    }

    #[test]
    fn arbitrary_payload_behind_a_valid_header_never_panics(
        payload in proptest::collection::vec(any::<u8>(), 0..400),
        count in 0u32..4,
    ) {
        let mut bytes = encode_with(vec![]);
        bytes[112..116].copy_from_slice(&count.to_le_bytes());
        bytes[116..124].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        bytes.extend_from_slice(&payload);
        reseal(&mut bytes);
        if let Ok(s) = decode(&bytes) {
            prop_assert_eq!(validate_set(&s), Ok(()));
            prop_assert_eq!(s.clusters.len(), count as usize);
        }
    }

    #[test]
    fn mutated_encodings_never_panic(
        s in set(),
        edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..4), 1..8),
        fix_checksum in any::<bool>(),
    ) {
        let mut bytes = encode(&s);
        for (at, byte, kind) in edits {
            if bytes.is_empty() {
                break;
            }
            let i = at.index(bytes.len());
            match kind {
                0 | 1 => bytes[i] = byte,
                2 => bytes.truncate(i),
                _ => bytes.insert(i, byte),
            }
        }
        if fix_checksum {
            reseal(&mut bytes);
        }
        match decode(&bytes) {
            Ok(d) => {
                // Whatever is accepted is valid and encodes back to what was read.
                prop_assert_eq!(validate_set(&d), Ok(()));
                prop_assert_eq!(decode(&encode(&d)), Ok(d));
            }
            Err(e) => prop_assert!(!e.to_string().is_empty()),
        }
    }

    #[test]
    fn every_payload_byte_flip_is_caught_by_the_checksum(s in set(), at in any::<prop::sample::Index>(), x in 1u8..) {
        let mut bytes = encode(&s);
        let header_len = u16::from_le_bytes([bytes[10], bytes[11]]) as usize;
        prop_assume!(bytes.len() > header_len);
        let i = header_len + at.index(bytes.len() - header_len);
        bytes[i] ^= x;
        let is_checksum_error = matches!(decode(&bytes), Err(FormatError::ChecksumMismatch { .. }));
        prop_assert!(is_checksum_error);
    }
}

// ---------------------------------------------------------------------------------
// One test per rejection reason
// ---------------------------------------------------------------------------------

#[test]
fn good_set_round_trips() {
    let s = good_set();
    assert_eq!(decode(&encode(&s)).unwrap(), s);
}

#[test]
fn bad_magic() {
    let mut b = encode(&good_set());
    b[0] = b'X';
    let e = decode(&b).unwrap_err();
    assert!(matches!(e, FormatError::BadMagic { .. }), "{e:?}");
    assert!(e.to_string().contains("bad magic at offset 0"), "{e}");
    // An ELF file is not a translation set.
    assert!(matches!(
        decode(b"\x7fELF\x02\x01\x01"),
        Err(FormatError::BadMagic { .. })
    ));
    assert!(matches!(
        decode(b""),
        Err(FormatError::Truncated {
            field: "magic",
            offset: 0,
            ..
        })
    ));
}

#[test]
fn unsupported_version() {
    let mut b = encode(&good_set());
    let other = VERSION + 1;
    b[8..10].copy_from_slice(&other.to_le_bytes());
    let e = decode(&b).unwrap_err();
    assert_eq!(
        e,
        FormatError::UnsupportedVersion {
            found: other,
            supported: VERSION
        }
    );
    assert!(e.to_string().contains(&format!("version {other}")));
    // Version 1 (contiguous clusters, before regions over the control-flow graph)
    // is refused too: its clusters do not decode as version 2's.
    b[8..10].copy_from_slice(&1u16.to_le_bytes());
    assert!(matches!(
        decode(&b),
        Err(FormatError::UnsupportedVersion { found: 1, .. })
    ));
    // Version 2 has a SHA-256 guest identity and no learn sites: an image linked
    // by that avex is said to be of another version, not of another guest.
    b[8..10].copy_from_slice(&2u16.to_le_bytes());
    let e = decode(&b).unwrap_err();
    assert!(matches!(
        e,
        FormatError::UnsupportedVersion { found: 2, .. }
    ));
    assert!(e.to_string().contains("another version of avex"), "{e}");
}

#[test]
fn truncated_everywhere_names_the_offset() {
    let b = encode(&good_set());
    for n in 0..b.len() {
        let e = decode(&b[..n]).unwrap_err();
        match &e {
            FormatError::Truncated {
                offset, available, ..
            } => {
                assert!(*offset <= n, "cut at {n}: {e}");
                assert!(*offset + *available == n, "cut at {n}: {e}");
                assert!(e
                    .to_string()
                    .starts_with(&format!("truncated at offset {offset}")));
            }
            other => panic!("cut at {n}: expected Truncated, got {other:?}"),
        }
    }
}

#[test]
fn truncated_payload_reports_payload_offset() {
    let b = encode(&good_set());
    let header_len = u16::from_le_bytes([b[10], b[11]]) as usize;
    let e = decode(&b[..b.len() - 3]).unwrap_err();
    assert!(
        matches!(e, FormatError::Truncated { field: "payload", offset, .. } if offset == header_len),
        "{e:?}"
    );
}

#[test]
fn checksum_mismatch() {
    let mut b = encode(&good_set());
    let last = b.len() - 1;
    b[last] ^= 0x40;
    let e = decode(&b).unwrap_err();
    assert!(matches!(e, FormatError::ChecksumMismatch { .. }), "{e:?}");
    assert!(e.to_string().contains("checksum mismatch"));
}

#[test]
fn header_field_errors() {
    let base = encode(&good_set());
    let mut b = base.clone();
    b[12] = 1;
    assert!(matches!(
        decode(&b),
        Err(FormatError::BadField {
            field: "flags",
            offset: 12,
            ..
        })
    ));

    let mut b = base.clone();
    b[10..12].copy_from_slice(&170u16.to_le_bytes());
    assert!(matches!(
        decode(&b),
        Err(FormatError::BadField {
            field: "header length",
            offset: 10,
            ..
        })
    ));

    let mut b = base.clone();
    b[156..158].copy_from_slice(&300u16.to_le_bytes());
    assert!(matches!(
        decode(&b),
        Err(FormatError::BadField {
            field: "guest name length",
            offset: 156,
            ..
        })
    ));

    let mut b = base.clone();
    b[FIXED_HEADER_LEN] = 0xff; // first byte of the name
    assert!(matches!(
        decode(&b),
        Err(FormatError::BadField {
            field: "guest name",
            offset: 160,
            reason: "not UTF-8"
        })
    ));
}

#[test]
fn too_many_clusters() {
    let mut b = encode(&good_set());
    b[112..116].copy_from_slice(&((MAX_CLUSTERS as u32) + 1).to_le_bytes());
    assert!(matches!(
        decode(&b),
        Err(FormatError::TooManyClusters { .. })
    ));
}

#[test]
fn trailing_bytes() {
    let mut b = encode(&good_set());
    b.push(0);
    let len = b.len();
    assert_eq!(
        decode(&b),
        Err(FormatError::TrailingBytes {
            offset: len - 1,
            count: 1
        })
    );

    // Fewer clusters declared than the payload holds.
    let mut b = encode(&good_set());
    b[112..116].copy_from_slice(&1u32.to_le_bytes());
    assert!(matches!(decode(&b), Err(FormatError::TrailingBytes { .. })));
}

#[test]
fn payload_malformed_names_cluster_and_offset() {
    // Two clusters declared, one present.
    let mut b = encode_with(vec![good(0x1000)]);
    b[112..116].copy_from_slice(&2u32.to_le_bytes());
    let e = decode(&b).unwrap_err();
    match &e {
        FormatError::PayloadMalformed {
            cluster: 1, offset, ..
        } => assert_eq!(*offset, b.len()),
        other => panic!("{other:?}"),
    }
    assert!(e.to_string().contains("cluster 1"));

    // A bad enum tag inside the first cluster: the bitness byte comes first.
    let mut b = encode_with(vec![good(0x10)]);
    let header_len = u16::from_le_bytes([b[10], b[11]]) as usize;
    b[header_len] = 7;
    reseal(&mut b);
    let e = decode(&b).unwrap_err();
    assert!(
        matches!(e, FormatError::PayloadMalformed { cluster: 0, .. }),
        "{e:?}"
    );
}

#[test]
fn clusters_must_be_sorted_and_unique() {
    let e = decode(&encode_with(vec![good(0x2000), good(0x1000)])).unwrap_err();
    assert_eq!(
        e,
        FormatError::NotSorted {
            cluster: 1,
            entry: 0x1000,
            previous: 0x2000
        }
    );
    let e = decode(&encode_with(vec![good(0x2000), good(0x2000)])).unwrap_err();
    assert!(matches!(e, FormatError::NotSorted { cluster: 1, .. }));
    assert!(e.to_string().contains("sorted"));
}

#[test]
fn cluster_rule_violations() {
    let mut c = good(0x1000);
    c.insns.clear();
    assert_eq!(cluster_error(c), ClusterError::Empty);

    let mut c = good(0x1000);
    c.code[0].start = 0x1001;
    assert_eq!(
        cluster_error(c),
        ClusterError::OutsideCode {
            insn: 0,
            rip: 0x1000
        }
    );

    let mut c = good(0x1000);
    c.insns[1].len = 0;
    assert_eq!(
        cluster_error(c),
        ClusterError::BadLength { insn: 1, len: 0 }
    );
    let mut c = good(0x1000);
    c.insns[1].len = 16;
    assert_eq!(
        cluster_error(c),
        ClusterError::BadLength { insn: 1, len: 16 }
    );

    // Code ranges: sorted, apart, not touching.
    let mut c = good(0x1000);
    let tail = c.code[0].bytes.split_off(3);
    c.code.push(CodeRange {
        start: 0x1003,
        bytes: tail,
    });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 1, .. }
    ));
    let mut c = good(0x1000);
    c.code.push(CodeRange {
        start: 0x800,
        bytes: vec![0x90],
    });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 1, .. }
    ));
    let mut c = good(0x1000);
    c.code.push(CodeRange {
        start: 0x2000,
        bytes: vec![],
    });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 1, .. }
    ));

    // One RIP, one length.
    let mut c = good(0x1000);
    c.insns.push(Insn {
        len: 2,
        ..c.insns[0].clone()
    });
    assert_eq!(
        cluster_error(c),
        ClusterError::LengthDiffers {
            insn: 0,
            rip: 0x1000
        }
    );

    let mut c = good(0x1000);
    c.code[0].bytes.pop();
    assert_eq!(
        cluster_error(c),
        ClusterError::OutsideCode {
            insn: 3,
            rip: 0x1004
        }
    );

    let c = Cluster::contiguous(
        Bitness::B64,
        u64::MAX - 2,
        vec![0; 5],
        vec![Insn {
            len: 5,
            ..out_dx(u64::MAX - 2)
        }],
        vec![],
    );
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 0, .. }
    ));

    let mut c = good(0xffff_fffc);
    c.bitness = Bitness::B32;
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 0, .. }
    ));

    // Too large: 4097 bytes.
    let mut c = good(0x1000);
    let n = MAX_CLUSTER_BYTES + 1;
    c.insns = (0..n as u64).map(|i| out_dx(0x1000 + i)).collect();
    c.back_edges.clear();
    c.code[0].bytes = vec![0xee; n];
    assert!(matches!(cluster_error(c), ClusterError::TooLarge { .. }));

    let mut c = good(0x1000);
    c.insns[2].op = Op::Jmp {
        target: Target::Insn(4),
    };
    c.back_edges.clear();
    assert_eq!(
        cluster_error(c),
        ClusterError::TargetOutOfRange {
            insn: 2,
            target: 4,
            count: 4
        }
    );

    let mut c = good(0x1000);
    c.back_edges.clear();
    assert_eq!(
        cluster_error(c),
        ClusterError::UnrecordedBackEdge { insn: 2 }
    );

    let mut c = good(0x1000);
    c.back_edges[0].insn = 9;
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadBackEdge { index: 0, .. }
    ));
    let mut c = good(0x1000);
    c.back_edges[0].insn = 1; // an IN, not a branch
    let e = cluster_error(c);
    assert!(
        matches!(e, ClusterError::BadBackEdge { index: 0, reason } if reason.contains("not a branch"))
    );
    let mut c = good(0x1000);
    c.insns[2].op = Op::Jmp {
        target: Target::Insn(3),
    };
    assert!(matches!(cluster_error(c), ClusterError::BadBackEdge { .. })); // forward branch
    let mut c = good(0x1000);
    c.back_edges.push(BackEdge { insn: 2, cap: None });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadBackEdge { index: 1, .. }
    ));

    let mut c = good(0x1000);
    c.insns[0].exit_class = Some(ExitClass::Cpuid);
    assert_eq!(
        cluster_error(c),
        ClusterError::ExitClassMismatch { insn: 0 }
    );
    // No instruction marked exiting: nothing to enter the cluster at.
    let mut c = good(0x1000);
    for insn in &mut c.insns {
        insn.exit_class = None;
    }
    assert_eq!(cluster_error(c), ClusterError::FirstNotExiting);
    // The first OUT unmarked (a port the policy passes through): it is a gap filler
    // in a loop head the back-edge returns to, which is allowed.
    let mut c = good(0x1000);
    c.insns[0].exit_class = None;
    assert!(decode(&encode_with(vec![c])).is_ok());
}

fn with_op(op: Op) -> ClusterError {
    let mut c = good(0x1000);
    c.insns[1].op = op;
    c.insns[1].exit_class = None;
    cluster_error(c)
}

fn operand_reason(op: Op) -> &'static str {
    match with_op(op) {
        ClusterError::Operand { insn: 1, reason } => reason,
        other => panic!("expected an operand error, got {other:?}"),
    }
}

#[test]
fn operand_rule_violations() {
    let r = |index, size, high8| RegRef { index, size, high8 };
    let m = |scale, addr_size| MemRef {
        seg: Seg::Ds,
        base: Some(RBX),
        index: None,
        scale,
        disp: 0,
        addr_size,
    };
    let reason = operand_reason(Op::Mov {
        size: Size::S8,
        dst: Operand::Reg(r(16, Size::S8, false)),
        src: Operand::Imm(1),
    });
    assert!(reason.contains("16"), "{reason}");
    // Scale 3.
    assert!(operand_reason(Op::Lea {
        dst: r(0, Size::S8, false),
        addr: m(3, Size::S8)
    })
    .contains("scale"));
    // Address size 1 and 16-bit addressing in 64-bit code.
    assert!(operand_reason(Op::Invlpg {
        addr: m(1, Size::S1)
    })
    .contains("address size"));
    assert!(operand_reason(Op::Invlpg {
        addr: m(1, Size::S2)
    })
    .contains("16-bit"));
    // CR5.
    assert!(operand_reason(Op::MovToCr { cr: 5, src: 0 }).contains("control register"));
    // High byte needs S1 and index < 4.
    assert!(operand_reason(Op::Setcc {
        cond: Cond::E,
        dst: Operand::Reg(r(5, Size::S1, true))
    })
    .contains("high-byte"));
    assert!(operand_reason(Op::Unary {
        op: UnaryOp::Inc,
        size: Size::S2,
        dst: Operand::Reg(r(0, Size::S2, true))
    })
    .contains("high-byte"));
    // Size mismatch between op and register.
    assert!(operand_reason(Op::Alu {
        op: AluOp::Add,
        size: Size::S4,
        dst: Operand::Reg(r(0, Size::S8, false)),
        src: Operand::Imm(1)
    })
    .contains("width"));
    // Immediate destination, two memory operands.
    assert!(operand_reason(Op::Mov {
        size: Size::S4,
        dst: Operand::Imm(0),
        src: Operand::Imm(1)
    })
    .contains("immediate"));
    assert!(operand_reason(Op::Mov {
        size: Size::S4,
        dst: Operand::Mem(m(1, Size::S8)),
        src: Operand::Mem(m(1, Size::S8))
    })
    .contains("two memory"));
    // MOVZX source not narrower.
    assert!(operand_reason(Op::Movzx {
        dst: r(0, Size::S2, false),
        src: Operand::Reg(r(1, Size::S2, false)),
        src_size: Size::S2
    })
    .contains("narrower"));
    // Port I/O of 8 bytes.
    assert!(operand_reason(Op::In {
        size: Size::S8,
        port: PortSrc::Dx
    })
    .contains("port I/O size"));
    // Shift count from a register other than CL.
    assert!(operand_reason(Op::Shift {
        op: ShiftOp::Shl,
        size: Size::S4,
        dst: Operand::Reg(r(0, Size::S4, false)),
        count: Operand::Reg(r(2, Size::S1, false))
    })
    .contains("CL"));
    // Push of 4 bytes in 64-bit code.
    assert!(operand_reason(Op::Push {
        size: Size::S4,
        src: Operand::Imm(0)
    })
    .contains("push"));
}

#[test]
fn bitness_limits_registers_and_sizes() {
    let mut c = good(0x1000);
    c.bitness = Bitness::B32;
    c.insns[1].op = Op::Mov {
        size: Size::S4,
        dst: Operand::Reg(RegRef {
            index: 9,
            size: Size::S4,
            high8: false,
        }),
        src: Operand::Imm(0),
    };
    c.insns[1].exit_class = None;
    assert!(
        matches!(cluster_error(c.clone()), ClusterError::Operand { reason, .. } if reason.contains("R8"))
    );
    c.insns[1].op = Op::Mov {
        size: Size::S8,
        dst: Operand::Reg(RegRef {
            index: 0,
            size: Size::S8,
            high8: false,
        }),
        src: Operand::Imm(0),
    };
    assert!(
        matches!(cluster_error(c), ClusterError::Operand { reason, .. } if reason.contains("64-bit"))
    );
}

#[test]
fn error_messages_name_cluster_and_entry() {
    let mut c = good(0x1234);
    c.code[0].bytes.pop();
    let e = decode(&encode_with(vec![good(0x10), c])).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("cluster 1") && msg.contains("0x1234"), "{msg}");
}

// ---------------------------------------------------------------------------------
// Identity and staleness
// ---------------------------------------------------------------------------------

#[test]
fn identity_depends_on_addresses_and_bytes_not_order() {
    let a: &[u8] = &[1, 2, 3];
    let b: &[u8] = &[4, 5];
    let id = of_segments([(0x1000, a), (0x2000, b)]);
    assert_eq!(id, of_segments([(0x2000, b), (0x1000, a)]));
    assert_ne!(id, of_segments([(0x1000, a), (0x3000, b)]));
    assert_ne!(id, of_segments([(0x1000, a), (0x2000, &[4u8, 6][..])]));
    // Moving a byte across a segment boundary changes the identity.
    assert_ne!(
        of_segments([(0x1000, &[1u8, 2][..]), (0x2000, &[3u8, 4, 5][..])]),
        id
    );
    assert_ne!(of_segments([]), id);
    // Segments without file bytes do not count.
    assert_eq!(
        of_segments([(0x1000, a), (0x8000, &[][..]), (0x2000, b)]),
        id
    );
}

#[test]
fn identity_is_xxh3_128_under_two_seeds_of_the_documented_stream() {
    // The stream: domain tag, then per segment (by address) address, length, bytes.
    let (a, b): (&[u8], &[u8]) = (&[0x90; 100_000], &[1, 2, 3]);
    let mut stream = b"avex-guest-identity-v2-xxh3".to_vec();
    for (paddr, bytes) in [(0x1000u64, a), (0x20_0000u64, b)] {
        stream.extend_from_slice(&paddr.to_le_bytes());
        stream.extend_from_slice(&(bytes.len() as u64).to_le_bytes());
        stream.extend_from_slice(bytes);
    }
    let mut want = [0u8; 32];
    for (half, seed) in want
        .chunks_exact_mut(16)
        .zip([0x6176_6578_2d69_6431u64, 0x6176_6578_2d69_6432])
    {
        let d = xxhash_rust::xxh3::xxh3_128_with_seed(&stream, seed);
        half.copy_from_slice(&d.to_le_bytes());
    }
    assert_eq!(of_segments([(0x20_0000, b), (0x1000, a)]), want);
}

#[test]
fn check_against_rejects_stale_and_other_policy() {
    let s = good_set();
    assert_eq!(check_against(&s, &[9; 32], &[3; 32]), Ok(()));
    let e = check_against(&s, &[8; 32], &[3; 32]).unwrap_err();
    assert!(matches!(e, Rejection::OtherGuest { .. }));
    let msg = e.to_string();
    assert!(msg.contains("stale") && msg.contains("guest.elf"), "{msg}");
    let e = check_against(&s, &[9; 32], &[0; 32]).unwrap_err();
    assert_eq!(
        e,
        Rejection::OtherPolicy {
            assumed: [3; 32],
            running: [0; 32]
        }
    );
    assert!(e.to_string().contains("policy"));
}

#[test]
fn magic_and_layout_constants() {
    let b = encode(&good_set());
    assert_eq!(&b[..8], &MAGIC);
    assert_eq!(u16::from_le_bytes([b[8], b[9]]), VERSION);
    assert_eq!(
        u16::from_le_bytes([b[10], b[11]]) as usize,
        FIXED_HEADER_LEN + 9 + 4
    );
    assert_eq!(&b[16..48], &[9; 32]);
    assert_eq!(&b[48..80], &[3; 32]);
}

/// The generator reaches what regions add: several code ranges, each control op,
/// guards into the cluster and out of it, and backward guard targets.
#[test]
fn generated_clusters_cover_regions() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[3; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let strategy = cluster();
    let mut seen = [0u32; 8];
    for _ in 0..512 {
        let c = strategy.new_tree(&mut runner).unwrap().current();
        assert_eq!(validate(&c), Ok(()));
        let ops = |f: fn(&Op) -> bool| c.insns.iter().any(|i| f(&i.op));
        let flags = [
            c.code.len() > 1,
            ops(|o| matches!(o, Op::Call { .. })),
            ops(|o| matches!(o, Op::CallIndirect { .. })),
            ops(|o| matches!(o, Op::JmpIndirect { .. })),
            ops(|o| matches!(o, Op::Ret { .. })),
            c.guards.iter().any(|g| matches!(g.target, Target::Insn(_))),
            c.guards.iter().any(|g| matches!(g.target, Target::Exit(_))),
            c.guards
                .iter()
                .any(|g| matches!(g.target, Target::Insn(t) if t <= g.insn)),
        ];
        for (k, f) in flags.iter().enumerate() {
            seen[k] += u32::from(*f);
        }
    }
    assert!(seen.iter().all(|&n| n >= 5), "coverage {seen:?}");
}

/// Guards and code ranges in a file are untrusted like the rest: a bad one is
/// refused with the cluster named.
#[test]
fn region_rule_violations_are_refused_by_decode() {
    let mut c = good(0x1000);
    c.guards.push(Guard {
        insn: 1,
        expect: 0x5000,
        target: Target::Exit(0x5000),
    });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadGuard { index: 0, .. }
    ));
    let mut c = good(0x1000);
    c.code.push(CodeRange {
        start: 0x1002,
        bytes: vec![0x90],
    });
    assert!(matches!(
        cluster_error(c),
        ClusterError::BadCodeRange { range: 1, .. }
    ));
}

/// With `AVEX_FUZZ_SEEDS=DIR`, write valid encodings of generated sets into DIR as a
/// seed corpus for `fuzz/` (`format_decode`). Without it, checks the same sets
/// decode (so the seeds are known good).
#[test]
fn fuzz_seeds() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
    let rng = TestRng::from_seed(RngAlgorithm::ChaCha, &[7; 32]);
    let mut runner = TestRunner::new_with_rng(Config::default(), rng);
    let dir = std::env::var_os("AVEX_FUZZ_SEEDS").map(std::path::PathBuf::from);
    if let Some(d) = &dir {
        std::fs::create_dir_all(d).unwrap();
    }
    let strategy = set();
    for i in 0..64 {
        let s = strategy.new_tree(&mut runner).unwrap().current();
        let bytes = encode(&s);
        assert_eq!(decode(&bytes).unwrap(), s);
        if let Some(d) = &dir {
            std::fs::write(d.join(format!("seed-{i:02}")), &bytes).unwrap();
        }
    }
}

/// A loop head (plain gap fillers reached only by the cluster's back-edge) may come
/// before the first exiting instruction; anything else before it is refused.
#[test]
fn loop_head_before_the_first_exiting_instruction() {
    let nop = |rip| Insn {
        rip,
        len: 1,
        op: Op::Nop,
        exit_class: None,
    };
    let jmp = |rip, t| Insn {
        rip,
        len: 2,
        op: Op::Jmp {
            target: Target::Insn(t),
        },
        exit_class: None,
    };
    // nop; out dx, al; jmp 0 (back to the loop head)
    let c = Cluster::contiguous(
        Bitness::B64,
        0x1000,
        vec![0x90, 0xee, 0xeb, 0xfc],
        vec![nop(0x1000), out_dx(0x1001), jmp(0x1002, 0)],
        vec![BackEdge {
            insn: 2,
            cap: Some(10),
        }],
    );
    assert_eq!(validate(&c), Ok(()));

    // The back-edge goes to the exiting instruction, not the head: nothing reaches it.
    let mut d = c.clone();
    d.insns[2].op = Op::Jmp {
        target: Target::Insn(1),
    };
    assert_eq!(validate(&d), Err(ClusterError::FirstNotExiting));

    // A conditional branch in the head (the loop's exit test) is allowed.
    let mut d = c.clone();
    d.insns[0] = Insn {
        len: 1,
        op: Op::Jcc {
            cond: avex_core::ir::Cond::E,
            target: Target::Exit(0x2000),
        },
        exit_class: None,
        rip: 0x1000,
    };
    assert_eq!(validate(&d), Ok(()));

    // An unconditional branch in the head is not a gap filler.
    let mut d = c.clone();
    d.insns[0] = Insn {
        len: 1,
        ..jmp(0x1000, 1)
    };
    assert_eq!(validate(&d), Err(ClusterError::FirstNotExiting));

    // More than MAX_LOOP_HEAD_INSNS fillers before the first exiting instruction.
    let n = avex_core::format::MAX_LOOP_HEAD_INSNS as u64 + 1;
    let mut insns: Vec<Insn> = (0..n).map(|i| nop(0x1000 + i)).collect();
    insns.push(out_dx(0x1000 + n));
    insns.push(jmp(0x1001 + n, 0));
    let d = Cluster::contiguous(
        Bitness::B64,
        0x1000,
        vec![0x90; n as usize + 3],
        insns,
        vec![BackEdge {
            insn: n as u16 + 1,
            cap: None,
        }],
    );
    assert_eq!(validate(&d), Err(ClusterError::FirstNotExiting));

    // No exiting instruction at all.
    let d = Cluster::contiguous(Bitness::B64, 0x1000, vec![0x90], vec![nop(0x1000)], vec![]);
    assert_eq!(validate(&d), Err(ClusterError::FirstNotExiting));
}

#[test]
fn more_back_edges_than_the_engine_counts_are_refused() {
    // `out dx, al` then N `jmp` back to it: each a back-edge record.
    let cluster = |n: u64| {
        let mut insns = vec![out_dx(0x1000)];
        insns.extend((0..n).map(|i| Insn {
            rip: 0x1001 + i,
            len: 1,
            op: Op::Jmp {
                target: Target::Insn(0),
            },
            exit_class: None,
        }));
        Cluster::contiguous(
            Bitness::B64,
            0x1000,
            vec![0x90; n as usize + 1],
            insns,
            (1..=n)
                .map(|i| BackEdge {
                    insn: i as u16,
                    cap: Some(10),
                })
                .collect(),
        )
    };
    let limit = avex_core::ir::limits::MAX_BACK_EDGES as u64;
    assert_eq!(validate(&cluster(limit)), Ok(()));
    assert!(matches!(
        validate(&cluster(limit + 1)),
        Err(ClusterError::BadBackEdge { .. })
    ));
}
