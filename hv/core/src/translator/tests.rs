//! Tests of [`super`].
use super::*;
use crate::ir::{BackEdge, PortSrc, Size, Target};
use crate::policy::{ExitPolicy, VmcsControl};
use alloc::string::ToString;
use alloc::vec;

/// Concatenated encodings.
fn asm(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn translate64(code: &[u8], rip: u64) -> Result<Cluster, NoCluster> {
    translate(
        code,
        rip,
        Bitness::B64,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
}

/// The region entered at `rip` in 64-bit code from `src` under the default policy,
/// checked by the IR's validator.
fn region64(src: &mut dyn CodeSource, rip: u64, config: &TranslatorConfig) -> Translated {
    let t = translate_region(src, rip, Bitness::B64, &ExitPolicy::default(), config).unwrap();
    crate::ir::validate(&t.cluster).unwrap();
    t
}

// Encodings used below (64-bit unless noted).
const CPUID: &[u8] = &[0x0f, 0xa2];
const RDTSC: &[u8] = &[0x0f, 0x31];
const WRMSR: &[u8] = &[0x0f, 0x30];
const HLT: &[u8] = &[0xf4];
const NOP: &[u8] = &[0x90];
// An instruction the engine does not run (INT3 was this until the engine ran it).
const INT3: &[u8] = &[0xcc];
const IN_AL_DX: &[u8] = &[0xec];
const OUT_DX_AL: &[u8] = &[0xee];
const OUT_80_AL: &[u8] = &[0xe6, 0x80];
const LOAD_EAX_RBX: &[u8] = &[0x8b, 0x03]; // mov eax, [rbx]
const STORE_RBX_EAX: &[u8] = &[0x89, 0x03]; // mov [rbx], eax
const PUSH_RAX: &[u8] = &[0x50];
const POP_RAX: &[u8] = &[0x58];
const TEST_AL_20: &[u8] = &[0xa8, 0x20];
const DEC_ECX: &[u8] = &[0xff, 0xc9];
const MOV_CR3_RAX: &[u8] = &[0x0f, 0x22, 0xd8];
const MOV_CR0_RAX: &[u8] = &[0x0f, 0x22, 0xc0];

fn jz(rel: i8) -> Vec<u8> {
    vec![0x74, rel as u8]
}
fn jnz(rel: i8) -> Vec<u8> {
    vec![0x75, rel as u8]
}
fn jmp(rel: i8) -> Vec<u8> {
    vec![0xeb, rel as u8]
}

/// The structural promises every cluster keeps (also checked by the proptest).
fn check_cluster(cluster: &Cluster, code: &[u8], rip: u64, config: &TranslatorConfig) {
    check_cluster_in(cluster, code, rip, rip, config)
}

/// [`check_cluster`] for [`translate_in`]: `code` starts at `code_rip`.
fn check_cluster_in(
    cluster: &Cluster,
    code: &[u8],
    code_rip: u64,
    rip: u64,
    config: &TranslatorConfig,
) {
    assert!(!cluster.insns.is_empty(), "a cluster has instructions");
    assert_eq!(
        cluster.entry_rip(),
        Some(rip),
        "entered at the exiting instruction"
    );
    let entry = cluster.entry_index().unwrap();
    assert!(
        entry <= crate::ir::limits::MAX_LOOP_HEAD_INSNS,
        "the entry is laid out first, after at most a loop head"
    );
    // Whatever the config, the translator builds only what the IR accepts.
    if let Err(e) = crate::ir::validate(cluster) {
        panic!("the translator built a cluster the validator refuses: {e}");
    }
    assert!(code_rip <= cluster.lowest());
    for range in &cluster.code {
        let from = (range.start - code_rip) as usize;
        assert_eq!(
            range.bytes,
            code[from..from + range.bytes.len()],
            "the guest's bytes"
        );
    }
    let open = (0..cluster.insns.len())
        .any(|i| cluster.insns[i].op.is_guarded() && cluster.guards_of(i).next().is_none());
    assert!(cluster.exiting_count() >= 2 || !cluster.back_edges.is_empty() || open);
    assert!(cluster.insns.len() <= config.max_cluster_insns.max(1));
    let calls = cluster
        .insns
        .iter()
        .any(|i| matches!(i.op, Op::Call { .. }) || i.op.is_guarded());
    for insn in &cluster.insns {
        if let (Some(Target::Exit(addr)), false) = (insn.op.target(), calls) {
            assert!(
                cluster.insns.iter().all(|i| i.rip != addr),
                "inside targets resolved"
            );
        }
    }
}

#[test]
fn starts_only_at_an_exiting_instruction() {
    assert_eq!(
        translate64(&asm(&[NOP, CPUID, CPUID]), 0x1000),
        Err(NoCluster::NotExiting)
    );
    assert_eq!(translate64(&[], 0x1000), Err(NoCluster::Undecodable));
    assert_eq!(translate64(&[0x0f], 0x1000), Err(NoCluster::Undecodable));
    // push es is invalid in 64-bit code
    assert_eq!(
        translate64(&[0x06, 0x0f, 0xa2], 0x1000),
        Err(NoCluster::Undecodable)
    );
    // VMCALL always exits but the engine cannot run it
    assert_eq!(
        translate64(&asm(&[&[0x0f, 0x01, 0xc1], CPUID]), 0x1000),
        Err(NoCluster::Unsupported(Mnemonic::Vmcall))
    );
    // HLT and paging-mode changes end every cluster
    assert_eq!(
        translate64(&asm(&[HLT, CPUID]), 0x1000),
        Err(NoCluster::EndsCluster)
    );
    assert_eq!(
        translate64(&asm(&[MOV_CR0_RAX, CPUID]), 0x1000),
        Err(NoCluster::EndsCluster)
    );
}

#[test]
fn reasons_have_names_for_reports() {
    assert_eq!(
        NoCluster::Unsupported(Mnemonic::Int3).to_string(),
        "unsupported (Int3)"
    );
    assert_eq!(
        NoCluster::Unsupported(Mnemonic::Int3).blocker(),
        Some(Mnemonic::Int3)
    );
    assert_eq!(NoCluster::Single.to_string(), "single");
    assert_eq!(NoCluster::Single.blocker(), None);
    assert_eq!(Shape::Looping.name(), "looping");
    let config = TranslatorConfig::default();
    let bytes = postcard::to_allocvec(&config).unwrap();
    assert_eq!(
        postcard::from_bytes::<TranslatorConfig>(&bytes).unwrap(),
        config
    );
}

#[test]
fn explains_what_ended_a_cluster() {
    let explained = |code: &[u8]| {
        translate_explained(
            code,
            0x1000,
            Bitness::B64,
            &ExitPolicy::default(),
            &TranslatorConfig::default(),
        )
        .unwrap()
        .grows_no_further
    };
    assert_eq!(
        explained(&asm(&[CPUID, RDTSC, INT3])),
        NoCluster::Unsupported(Mnemonic::Int3)
    );
    assert_eq!(explained(&asm(&[CPUID, RDTSC])), NoCluster::CodeEnds);
    assert_eq!(
        explained(&asm(&[CPUID, RDTSC, HLT])),
        NoCluster::EndsCluster
    );
    let mut long = asm(&[CPUID, RDTSC]);
    long.extend(core::iter::repeat_n(0x90, 70));
    assert_eq!(explained(&long), NoCluster::Single);
}

#[test]
fn two_exits_make_a_cluster_one_does_not() {
    let code = asm(&[CPUID, NOP, RDTSC, NOP, NOP]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(c.insns.len(), 3, "ends at the last exiting instruction");
    assert_eq!(c.highest_end(), 0x1005);
    assert_eq!(exit_classes(&c), vec![ExitClass::Cpuid, ExitClass::Rdtsc]);
    assert_eq!(c.insns[1].exit_class, None);
    assert_eq!(shape(&c), Shape::StraightLine);

    assert_eq!(
        translate64(&asm(&[CPUID, NOP, NOP]), 0x1000),
        Err(NoCluster::CodeEnds)
    );
    assert_eq!(
        translate64(&asm(&[CPUID, &[0x0f]]), 0x1000),
        Err(NoCluster::CodeEnds)
    );
    assert_eq!(
        translate64(&asm(&[CPUID, NOP, &[0x06], CPUID]), 0x1000),
        Err(NoCluster::CodeEnds)
    );
}

#[test]
fn the_window_slides_with_each_exiting_instruction() {
    // CPUID, 15 NOPs, CPUID, 15 NOPs, CPUID: each exit opens a new 16-wide window.
    let mut code = CPUID.to_vec();
    for _ in 0..2 {
        code.extend(core::iter::repeat_n(0x90, 15));
        code.extend(CPUID);
    }
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 33);
    assert_eq!(c.exiting_count(), 3);
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());

    let short = TranslatorConfig {
        max_cluster_insns: 20,
        ..TranslatorConfig::default()
    };
    let c = translate(&code, 0x1000, Bitness::B64, &ExitPolicy::default(), &short).unwrap();
    assert_eq!(
        c.insns.len(),
        17,
        "cut at the last exit within the size cap"
    );
    check_cluster(&c, &code, 0x1000, &short);
}

/// The 16550 transmit loop as compilers emit it: the back-edge returns to the
/// `mov dx` before the exiting OUT.
const UART_TX_LOOP: &[u8] = &[
    0x66, 0xba, 0xf8, 0x03, // 0x100170 mov dx, 0x3f8      (loop head)
    0x89, 0xc8, //             0x100174 mov eax, ecx
    0xee, //                   0x100176 out dx, al         (entry)
    0x48, 0xff, 0xc6, //       0x100177 inc rsi
    0x66, 0xba, 0xfd, 0x03, // 0x10017a mov dx, 0x3fd
    0xec, //                   0x10017e in al, dx
    0xa8, 0x20, //             0x10017f test al, 0x20
    0x75, 0xed, //             0x100181 jnz 0x100170
];

#[test]
fn a_back_edge_to_a_loop_head_before_the_entry_takes_the_head_in() {
    let config = TranslatorConfig::default();
    let policy = ExitPolicy::default();
    let t = translate_in(
        UART_TX_LOOP,
        0x100170,
        0x100176,
        Bitness::B64,
        &policy,
        &config,
    )
    .unwrap();
    let c = &t.cluster;
    check_cluster_in(c, UART_TX_LOOP, 0x100170, 0x100176, &config);
    assert_eq!(c.lowest(), 0x100170);
    assert_eq!(c.highest_end(), 0x100183);
    assert_eq!(c.entry_index(), Some(2));
    assert_eq!(c.insns.len(), 8);
    assert_eq!(
        c.insns[7].op,
        Op::Jcc {
            cond: crate::ir::Cond::Ne,
            target: Target::Insn(0)
        }
    );
    assert_eq!(c.back_edges, vec![BackEdge { insn: 7, cap: None }]);
    assert_eq!(shape(c), Shape::Looping);

    // Without the bytes before the entry there is no head, and the loop's branch
    // leaves the cluster, so the cluster ends at its last exit.
    let c = translate64(&UART_TX_LOOP[6..], 0x100176).unwrap();
    assert_eq!((c.lowest(), c.highest_end()), (0x100176, 0x10017f));
    assert!(c.back_edges.is_empty());
}

#[test]
fn a_loop_head_must_be_plain_gap_fillers_ending_at_the_entry() {
    let config = TranslatorConfig::default();
    let policy = ExitPolicy::default();
    // Code before the entry that holds an exiting instruction (IN) is no loop
    // head: the region takes it in as a block after the entry.
    let exiting_head: &[u8] = &[
        0xec, //       0x2000 in al, dx
        0x89, 0xc8, // 0x2001 mov eax, ecx
        0xee, //       0x2003 out dx, al (entry)
        0xec, //       0x2004 in al, dx
        0x75, 0xf9, // 0x2005 jnz 0x2000
    ];
    let t = translate_in(exiting_head, 0x2000, 0x2003, Bitness::B64, &policy, &config).unwrap();
    assert_eq!(t.cluster.entry_index(), Some(0));
    assert_eq!(t.cluster.lowest(), 0x2000);
    assert_eq!(t.cluster.exiting_count(), 3);
    check_cluster_in(&t.cluster, exiting_head, 0x2000, 0x2003, &config);

    // The back-edge lands inside an instruction of the head: it does not decode to
    // the entry, so no head.
    let misaligned: &[u8] = &[
        0x66, 0xba, 0xf8, 0x03, // 0x3000 mov dx, 0x3f8
        0xee, //                   0x3004 out dx, al (entry)
        0xec, //                   0x3005 in al, dx
        0x75, 0xf9, //             0x3006 jnz 0x3001
    ];
    let t = translate_in(misaligned, 0x3000, 0x3004, Bitness::B64, &policy, &config).unwrap();
    assert_eq!(t.cluster.lowest(), 0x3004);
}

#[test]
fn a_loop_head_may_test_for_the_loop_exit() {
    // PCI probing as compiled: the head counts and leaves when done.
    let code: &[u8] = &[
        0xff, 0xc3, //             0x6000 inc ebx
        0x83, 0xfb, 0x10, //       0x6002 cmp ebx, 16
        0x74, 0x20, //             0x6005 je 0x6027 (leaves the loop)
        0x66, 0xba, 0xf8, 0x0c, // 0x6007 mov dx, 0xcf8
        0xef, //                   0x600b out dx, eax (entry)
        0x66, 0xba, 0xfc, 0x0c, // 0x600c mov dx, 0xcfc
        0xed, //                   0x6010 in eax, dx
        0x83, 0xf8, 0xff, //       0x6011 cmp eax, -1
        0x74, 0xea, //             0x6014 je 0x6000
    ];
    let config = TranslatorConfig::default();
    let policy = ExitPolicy::default();
    let t = translate_in(code, 0x6000, 0x600b, Bitness::B64, &policy, &config).unwrap();
    let c = &t.cluster;
    check_cluster_in(c, code, 0x6000, 0x600b, &config);
    assert_eq!(c.entry_index(), Some(4));
    assert!(matches!(
        c.insns[2].op,
        Op::Jcc {
            target: Target::Exit(0x6027),
            ..
        }
    ));
    assert_eq!(
        c.back_edges,
        vec![BackEdge { insn: 8, cap: None }],
        "a branch out of the cluster does not keep the loop from qualifying"
    );

    // A head branch that stays inside skips the OUT but still passes the IN: every
    // way round holds an exiting instruction, so the loop still qualifies.
    let mut inside = code.to_vec();
    inside[6] = 0x05; // je 0x600c: into the cluster, past the OUT
    let t = translate_in(&inside, 0x6000, 0x600b, Bitness::B64, &policy, &config).unwrap();
    check_cluster_in(&t.cluster, &inside, 0x6000, 0x600b, &config);
    assert_eq!(t.cluster.back_edges, vec![BackEdge { insn: 8, cap: None }]);
    // Skipping every exiting instruction (je 0x6014, the back-edge itself) caps it.
    inside[6] = 0x0d;
    let t = translate_in(&inside, 0x6000, 0x600b, Bitness::B64, &policy, &config).unwrap();
    check_cluster_in(&t.cluster, &inside, 0x6000, 0x600b, &config);
    assert_eq!(
        t.cluster.back_edges,
        vec![BackEdge {
            insn: 8,
            cap: Some(config.back_edge_cap)
        }]
    );
}

#[test]
fn a_poll_loop_with_one_exit_is_a_cluster() {
    // top: in al, dx; test al, 0x20; jz top: every iteration is an exit.
    let code = [0xec, 0xa8, 0x20, 0x74, 0xfb];
    let c = translate64(&code, 0x5000).unwrap();
    assert_eq!(c.exiting_count(), 1);
    assert_eq!(c.insns.len(), 3);
    assert_eq!(c.back_edges, vec![BackEdge { insn: 2, cap: None }]);
    check_cluster(&c, &code, 0x5000, &TranslatorConfig::default());
}

#[test]
fn looks_ahead_as_far_as_configured() {
    // The paper's window: 16 instructions.
    let paper = TranslatorConfig {
        look_ahead: 16,
        ..TranslatorConfig::default()
    };
    let policy = ExitPolicy::default();
    let mut reaches = CPUID.to_vec();
    reaches.extend(core::iter::repeat_n(0x90, 15));
    reaches.extend(CPUID); // 16th instruction after the first
    let c = translate(&reaches, 0x1000, Bitness::B64, &policy, &paper).unwrap();
    assert_eq!(c.insns.len(), 17);
    check_cluster(&c, &reaches, 0x1000, &paper);

    let mut beyond = CPUID.to_vec();
    beyond.extend(core::iter::repeat_n(0x90, 16));
    beyond.extend(CPUID); // 17th: outside the window
    assert_eq!(
        translate(&beyond, 0x1000, Bitness::B64, &policy, &paper),
        Err(NoCluster::Single)
    );
    // avex's default, 64: compiled C between two port accesses across calls.
    assert_eq!(translate64(&beyond, 0x1000).unwrap().exiting_count(), 2);
    let mut far = CPUID.to_vec();
    far.extend(core::iter::repeat_n(0x90, 64));
    far.extend(CPUID);
    assert_eq!(translate64(&far, 0x1000), Err(NoCluster::Single));

    let wide = TranslatorConfig {
        look_ahead: 17,
        ..TranslatorConfig::default()
    };
    let c = translate(&beyond, 0x1000, Bitness::B64, &ExitPolicy::default(), &wide).unwrap();
    assert_eq!(c.insns.len(), 18);
}

#[test]
fn a_copied_pointers_fields_are_the_pages_of_the_original() {
    // Linux's transmit loop: fields of the port through %rbx, then `mov %rbx,%rdi`
    // and the accessor's fields through %rdi: one structure, one page.
    let copied = |copy: &[u8]| {
        asm(&[
            OUT_80_AL,
            LOAD_EAX_RBX,
            &[0x8b, 0x01], // mov eax, [rcx]
            &[0x8b, 0x02], // mov eax, [rdx]
            copy,
            &[0x8b, 0x47, 0x28], // mov eax, [rdi+0x28]
            &[0x8b, 0x06],       // mov eax, [rsi]
            OUT_80_AL,
        ])
    };
    let c = translate64(&copied(&[0x48, 0x89, 0xdf]), 0x1000).unwrap(); // mov rdi, rbx
    assert_eq!(c.exiting_count(), 2);
    // A 32-bit move is no pointer copy, and a copy written over is no copy.
    assert_eq!(
        translate64(&copied(&[0x89, 0xdf]), 0x1000), // mov edi, ebx
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
    let overwritten = [0x48, 0x89, 0xdf, 0x48, 0x83, 0xc7, 0x08]; // mov rdi, rbx; add rdi, 8
    assert_eq!(
        translate64(&copied(&overwritten), 0x1000),
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
}

/// Code at 0x1000 with the registers a run-time translation sees at its exit.
struct AtExit<'a> {
    code: Bytes<'a>,
    regs: [u64; 16],
}

impl CodeSource for AtExit<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> usize {
        self.code.read(addr, buf)
    }
    fn entry_registers(&self) -> Option<[u64; 16]> {
        Some(self.regs)
    }
}

#[test]
fn pointers_into_the_stack_at_the_exit_are_the_stacks_page_at_run_time() {
    use crate::ir::{RDI, RSI, RSP};
    const R8: u8 = 8;
    const R9: u8 = 9;
    // Linux's native_cpuid: CPUID, then its four results stored through four
    // pointer arguments (the caller's locals) with a POP between; then an OUT.
    let code = asm(&[
        CPUID,
        &[0x41, 0x89, 0x00], // mov [r8], eax
        &[0x89, 0x1e],       // mov [rsi], ebx
        &[0x5b],             // pop rbx
        &[0x89, 0x0f],       // mov [rdi], ecx
        &[0x41, 0x89, 0x11], // mov [r9], edx
        OUT_80_AL,
    ]);
    // Ahead of time nothing says where they point: five pages.
    assert_eq!(
        translate64(&code, 0x1000),
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
    let mut regs = [0u64; 16];
    regs[RSP as usize] = 0x7f00;
    for (r, v) in [(R8, 0x7f10), (RSI, 0x7f14), (RDI, 0x7f18), (R9, 0x7f1c)] {
        regs[r as usize] = v;
    }
    let config = TranslatorConfig::default();
    let mut src = AtExit {
        code: Bytes {
            base: 0x1000,
            bytes: &code,
        },
        regs,
    };
    let t = region64(&mut src, 0x1000, &config);
    assert_eq!(t.cluster.exiting_count(), 2);
    // Pointers to four other pages are four pages and the stack: too many.
    for (k, r) in [R8, RSI, RDI, R9].into_iter().enumerate() {
        src.regs[r as usize] = 0x10_0000 * (k as u64 + 1);
    }
    assert_eq!(
        translate_region(
            &mut src,
            0x1000,
            Bitness::B64,
            &ExitPolicy::default(),
            &config
        )
        .map(|t| t.cluster.exiting_count()),
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
}

#[test]
fn a_gap_touches_at_most_four_memory_pages() {
    let four = asm(&[
        OUT_80_AL,
        LOAD_EAX_RBX,
        STORE_RBX_EAX,
        LOAD_EAX_RBX,
        STORE_RBX_EAX,
        OUT_80_AL,
    ]);
    let c = translate64(&four, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 6);

    // Five pages (five base registers): one too many page walks.
    let five = asm(&[
        OUT_80_AL,
        LOAD_EAX_RBX,
        &[0x8b, 0x01], // mov eax, [rcx]
        &[0x8b, 0x02], // mov eax, [rdx]
        &[0x8b, 0x06], // mov eax, [rsi]
        &[0x8b, 0x07], // mov eax, [rdi]
        OUT_80_AL,
    ]);
    assert_eq!(
        translate64(&five, 0x1000),
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
    // Five accesses to one page (the engine walks it once), and stack accesses,
    // which share the stack's page.
    let one_page = asm(&[
        OUT_80_AL,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        STORE_RBX_EAX,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        PUSH_RAX,
        POP_RAX,
        PUSH_RAX,
        POP_RAX,
        OUT_80_AL,
    ]);
    assert_eq!(translate64(&one_page, 0x1000).unwrap().exiting_count(), 2);

    // Each gap has its own budget.
    let two_gaps = asm(&[
        OUT_80_AL,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        OUT_80_AL,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        LOAD_EAX_RBX,
        OUT_80_AL,
    ]);
    let c = translate64(&two_gaps, 0x1000).unwrap();
    assert_eq!(c.exiting_count(), 3);

    // The path stops at the fifth page; the cluster keeps what came before.
    let cut = asm(&[
        OUT_80_AL,
        OUT_80_AL,
        LOAD_EAX_RBX,
        &[0x8b, 0x01], // mov eax, [rcx]
        &[0x8b, 0x02], // mov eax, [rdx]
        &[0x8b, 0x06], // mov eax, [rsi]
        &[0x8b, 0x07], // mov eax, [rdi]
        OUT_80_AL,
    ]);
    let c = translate64(&cut, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 2);

    // Register-only fillers cost nothing.
    let mut free = OUT_80_AL.to_vec();
    for _ in 0..10 {
        free.extend([0x01, 0xc8]); // add eax, ecx
    }
    free.extend(OUT_80_AL);
    assert_eq!(translate64(&free, 0x1000).unwrap().insns.len(), 12);

    // With no page allowed, the one page the gap touches is too many.
    let tight = TranslatorConfig {
        max_gap_memory_accesses: 0,
        ..TranslatorConfig::default()
    };
    let policy = ExitPolicy::default();
    assert_eq!(
        translate(&four, 0x1000, Bitness::B64, &policy, &tight),
        Err(NoCluster::GapTooManyMemoryAccesses)
    );
}

#[test]
fn memory_access_counting() {
    let lowered = |bytes: &[u8]| {
        let mut d = Decoder::with_ip(64, bytes, 0, DecoderOptions::NONE);
        lower(&d.decode()).unwrap()
    };
    assert_eq!(memory_accesses(&lowered(LOAD_EAX_RBX)), 1);
    assert_eq!(memory_accesses(&lowered(&[0x83, 0x03, 0x01])), 1); // add [rbx], 1
    assert_eq!(memory_accesses(&lowered(PUSH_RAX)), 1);
    assert_eq!(memory_accesses(&lowered(&[0xff, 0x33])), 2); // push [rbx]
    assert_eq!(memory_accesses(&lowered(&[0x8f, 0x03])), 2); // pop [rbx]
    assert_eq!(memory_accesses(&lowered(&[0x8d, 0x03])), 0); // lea
    assert_eq!(memory_accesses(&lowered(&[0x6c])), 1); // insb
    assert_eq!(memory_accesses(&lowered(&[0xf3, 0x6c])), u32::MAX); // rep insb
    assert_eq!(memory_accesses(&lowered(&[0x01, 0xc8])), 0);
}

#[test]
fn a_loop_through_an_exiting_instruction_qualifies() {
    // L: in al, dx ; test al, 0x20 ; jz L ; out dx, al
    let code = asm(&[IN_AL_DX, TEST_AL_20, &jz(-5), OUT_DX_AL]);
    let c = translate64(&code, 0x2000).unwrap();
    check_cluster(&c, &code, 0x2000, &TranslatorConfig::default());
    assert_eq!(
        c.insns[2].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Insn(0)
        }
    );
    assert_eq!(c.back_edges, vec![BackEdge { insn: 2, cap: None }]);
    assert_eq!(shape(&c), Shape::Looping);
}

#[test]
fn a_loop_not_sure_to_exit_is_capped() {
    // out 0x80, al ; L: dec ecx ; jnz L ; out 0x80, al
    let code = asm(&[OUT_80_AL, DEC_ECX, &jnz(-4), OUT_80_AL]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(
        c.back_edges,
        vec![BackEdge {
            insn: 2,
            cap: Some(10)
        }]
    );

    let config = TranslatorConfig {
        back_edge_cap: 3,
        ..TranslatorConfig::default()
    };
    let c = translate(&code, 0x1000, Bitness::B64, &ExitPolicy::default(), &config).unwrap();
    assert_eq!(
        c.back_edges,
        vec![BackEdge {
            insn: 2,
            cap: Some(3)
        }]
    );

    // An exit behind a branch is not on the straight-line path: capped.
    // in al,dx ; L: test al,1 ; jz M ; in al,dx ; M: dec ecx ; jnz L ; out dx,al
    let code = asm(&[
        IN_AL_DX,
        &[0xa8, 0x01],
        &jz(1),
        IN_AL_DX,
        DEC_ECX,
        &jnz(-9),
        OUT_DX_AL,
    ]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(
        c.insns[2].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Insn(4)
        }
    );
    assert_eq!(
        c.insns[5].op,
        Op::Jcc {
            cond: crate::ir::Cond::Ne,
            target: Target::Insn(1)
        }
    );
    assert_eq!(
        c.back_edges,
        vec![BackEdge {
            insn: 5,
            cap: Some(10)
        }]
    );

    // A self-loop (jmp $ would leave nothing after it; loop $ counts down).
    let code = asm(&[OUT_80_AL, &[0xe2, 0xfe], OUT_80_AL]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(
        c.back_edges,
        vec![BackEdge {
            insn: 1,
            cap: Some(10)
        }]
    );
    assert_eq!(
        c.insns[1].op,
        Op::Loop {
            kind: crate::ir::LoopKind::Loop,
            addr_size: Size::S8,
            target: Target::Insn(1)
        }
    );
}

#[test]
fn forward_branches_inside_resolve_and_others_exit() {
    // in al,dx ; test al,1 ; jz over ; mov al,1 ; over: out dx,al
    let code = asm(&[IN_AL_DX, &[0xa8, 0x01], &jz(2), &[0xb0, 0x01], OUT_DX_AL]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(
        c.insns[2].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Insn(4)
        }
    );
    assert!(c.back_edges.is_empty());
    assert_eq!(shape(&c), Shape::Branching);

    // A target past the last exiting instruction, or inside an instruction, exits.
    // in al,dx ; jz +1 (just past the out) ; out dx,al ; nop ; nop ; nop
    let code = asm(&[IN_AL_DX, &jz(1), OUT_DX_AL, NOP, NOP, NOP]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 3);
    assert_eq!(
        c.insns[1].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Exit(0x1004)
        }
    );
    // in al,dx ; jz into the middle of `out 0x80, al` ; out 0x80, al
    let code = asm(&[IN_AL_DX, &jz(1), OUT_80_AL]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(
        c.insns[1].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Exit(0x1004)
        }
    );
}

#[test]
fn code_after_an_unconditional_jump_needs_a_branch_into_it() {
    // cpuid ; jmp away ; cpuid: the second cpuid is not reachable; the jump is
    // followed to where the code ends.
    let code = asm(&[CPUID, &jmp(0x40), CPUID]);
    assert_eq!(translate64(&code, 0x1000), Err(NoCluster::CodeEnds));
    // cpuid ; jmp over two bytes of data ; cpuid: followed, the data never decoded.
    let code = asm(&[CPUID, &jmp(2), &[0x0f, 0x0b], CPUID]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(c.exiting_count(), 2);
    assert_eq!(
        c.code.len(),
        2,
        "two code ranges, the data between left out"
    );

    // in al,dx ; jz else ; out dx,al ; jmp done ; else: out 0x80,al ; done: rdtsc
    let code = asm(&[IN_AL_DX, &jz(3), OUT_DX_AL, &jmp(2), OUT_80_AL, RDTSC]);
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(c.insns.len(), 6);
    assert_eq!(
        c.insns[1].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Insn(4)
        }
    );
    assert_eq!(
        c.insns[3].op,
        Op::Jmp {
            target: Target::Insn(5)
        }
    );
    assert_eq!(c.exiting_count(), 4);
}

#[test]
fn the_cluster_ends_before_what_the_engine_cannot_run() {
    let code = asm(&[CPUID, RDTSC, INT3, CPUID]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 2);
    assert_eq!(c.highest_end(), 0x1004);
    assert_eq!(c.code[0].bytes, code[..4].to_vec());

    assert_eq!(
        translate64(&asm(&[CPUID, INT3, CPUID]), 0x1000),
        Err(NoCluster::Unsupported(Mnemonic::Int3))
    );
    // lock cmpxchg16b [rax] (lock inc dword [rax] was this until LOCK was run)
    assert_eq!(
        translate64(
            &asm(&[CPUID, &[0xf0, 0x48, 0x0f, 0xc7, 0x08], CPUID]),
            0x1000
        ),
        Err(NoCluster::Unsupported(Mnemonic::Cmpxchg16b))
    );
    // call far [rax]
    assert_eq!(
        translate64(&asm(&[CPUID, &[0xff, 0x18], CPUID]), 0x1000),
        Err(NoCluster::Unsupported(Mnemonic::Call))
    );
}

#[test]
fn hlt_and_paging_changes_end_the_cluster_after_them() {
    let code = asm(&[OUT_80_AL, HLT, OUT_80_AL]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 2);
    assert_eq!(c.insns[1].op, Op::Hlt);

    // wrmsr ; wrmsr ; mov cr3, rax ; rdtsc: a CR3 load ends the cluster only when
    // configured to.
    let code = asm(&[WRMSR, WRMSR, MOV_CR3_RAX, RDTSC]);
    let c = translate64(&code, 0x1000).unwrap();
    assert_eq!(c.insns.len(), 4);
    let end_at_cr3 = TranslatorConfig {
        end_after_cr3_load: true,
        ..TranslatorConfig::default()
    };
    let c = translate(
        &code,
        0x1000,
        Bitness::B64,
        &ExitPolicy::default(),
        &end_at_cr3,
    )
    .unwrap();
    assert_eq!(
        exit_classes(&c),
        vec![ExitClass::Wrmsr, ExitClass::Wrmsr, ExitClass::MovToCr3]
    );
    assert_eq!(
        translate(
            &asm(&[MOV_CR3_RAX, RDTSC]),
            0x1000,
            Bitness::B64,
            &ExitPolicy::default(),
            &end_at_cr3
        ),
        Err(NoCluster::EndsCluster)
    );
    // CR4 writes and LMSW always end it.
    let code = asm(&[RDTSC, &[0x0f, 0x22, 0xe0], RDTSC]);
    assert_eq!(translate64(&code, 0x1000).unwrap().insns.len(), 2);
    let code = asm(&[RDTSC, &[0x0f, 0x01, 0xf0], RDTSC]);
    assert_eq!(translate64(&code, 0x1000).unwrap().insns.len(), 2);

    // A CR0 write that does not exit under the policy still ends the scan.
    let policy = ExitPolicy::builder().intercept_all_ports().build();
    let code = asm(&[OUT_80_AL, MOV_CR0_RAX, OUT_80_AL]);
    assert_eq!(
        translate(
            &code,
            0x1000,
            Bitness::B64,
            &policy,
            &TranslatorConfig::default()
        ),
        Err(NoCluster::EndsCluster)
    );
}

#[test]
fn the_policy_decides_what_exits() {
    // With port 0x80 passed through, `out 0x80, al` is a gap filler.
    let policy = ExitPolicy::default()
        .to_builder()
        .pass_through_ports(0x80, 0x80)
        .build();
    let code = asm(&[CPUID, OUT_80_AL, NOP]);
    assert_eq!(
        translate(
            &code,
            0x1000,
            Bitness::B64,
            &policy,
            &TranslatorConfig::default()
        ),
        Err(NoCluster::CodeEnds)
    );
    let code = asm(&[CPUID, OUT_80_AL, CPUID]);
    let c = translate(
        &code,
        0x1000,
        Bitness::B64,
        &policy,
        &TranslatorConfig::default(),
    )
    .unwrap();
    assert_eq!(c.insns[1].exit_class, None);
    assert_eq!(
        c.insns[1].op,
        Op::Out {
            size: Size::S1,
            port: PortSrc::Imm(0x80)
        }
    );
    // RDTSC exiting off: rdtsc is no start.
    let policy = ExitPolicy::default()
        .to_builder()
        .disable(VmcsControl::RdtscExiting)
        .build();
    assert_eq!(
        translate(
            &asm(&[RDTSC, CPUID]),
            0x1000,
            Bitness::B64,
            &policy,
            &TranslatorConfig::default()
        ),
        Err(NoCluster::NotExiting)
    );
}

#[test]
fn serial_line_status_polling_16550() {
    // mov dx,0x3fd ; in al,dx ; test al,0x20 ; jz back ; mov dx,0x3f8 ; out dx,al
    let code = asm(&[
        &[0x66, 0xba, 0xfd, 0x03],
        IN_AL_DX,
        TEST_AL_20,
        &jz(-9),
        &[0x66, 0xba, 0xf8, 0x03],
        OUT_DX_AL,
    ]);
    let base = 0xffff_ffff_8100_0000;
    assert_eq!(translate64(&code, base), Err(NoCluster::NotExiting));
    let c = translate64(&code[4..], base + 4).unwrap();
    check_cluster(&c, &code[4..], base + 4, &TranslatorConfig::default());
    assert_eq!(c.insns.len(), 5);
    // The poll's back-edge targets the `mov dx` before the cluster: it leaves.
    assert_eq!(
        c.insns[2].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Exit(base)
        }
    );
    assert!(c.back_edges.is_empty());
    assert_eq!(shape(&c), Shape::Branching);
    assert_eq!(exit_classes(&c), vec![ExitClass::In, ExitClass::Out]);

    // The same driver in 16-bit real-mode code (no operand-size prefix on mov dx).
    let code16 = asm(&[
        &[0xba, 0xfd, 0x03],
        IN_AL_DX,
        TEST_AL_20,
        &jz(-8),
        &[0xba, 0xf8, 0x03],
        OUT_DX_AL,
    ]);
    let c = translate(
        &code16[3..],
        0x7c03,
        Bitness::B16,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
    .unwrap();
    check_cluster(&c, &code16[3..], 0x7c03, &TranslatorConfig::default());
    assert_eq!(
        c.insns[2].op,
        Op::Jcc {
            cond: crate::ir::Cond::E,
            target: Target::Exit(0x7c00)
        }
    );
    assert_eq!(
        c.insns[3].op,
        Op::Mov {
            size: Size::S2,
            dst: Operand::Reg(crate::ir::RegRef {
                index: crate::ir::RDX,
                size: Size::S2,
                high8: false
            }),
            src: Operand::Imm(0x3f8),
        }
    );
    assert_eq!(c.highest_end(), 0x7c0c);
}

#[test]
fn pci_config_read_32_bit() {
    // mov eax,0x80001008 ; mov dx,0xcf8 ; out dx,eax ; mov dx,0xcfc ; in eax,dx
    let code = asm(&[
        &[0xb8, 0x08, 0x10, 0x00, 0x80],
        &[0x66, 0xba, 0xf8, 0x0c],
        &[0xef],
        &[0x66, 0xba, 0xfc, 0x0c],
        &[0xed],
    ]);
    let rip = 0x0010_0000 + 9;
    let c = translate(
        &code[9..],
        rip,
        Bitness::B32,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
    .unwrap();
    check_cluster(&c, &code[9..], rip, &TranslatorConfig::default());
    assert_eq!(c.insns.len(), 3);
    assert_eq!(
        c.insns[0].op,
        Op::Out {
            size: Size::S4,
            port: PortSrc::Dx
        }
    );
    assert_eq!(
        c.insns[2].op,
        Op::In {
            size: Size::S4,
            port: PortSrc::Dx
        }
    );
    assert_eq!(shape(&c), Shape::StraightLine);
    assert_eq!(c.bitness, Bitness::B32);
}

#[test]
fn context_switch_cr3_msrs_and_tsc() {
    // mov cr3, rax ; mov ecx, 0xc0000100 ; mov rax, rsi ; mov rdx, rsi ;
    // shr rdx, 32 ; wrmsr ; mov ecx, 0xc0000101 ; wrmsr ; mov rax, cr3 ;
    // rdmsr ; rdtsc
    let code = asm(&[
        MOV_CR3_RAX,
        &[0xb9, 0x00, 0x01, 0x00, 0xc0],
        &[0x48, 0x89, 0xf0],
        &[0x48, 0x89, 0xf2],
        &[0x48, 0xc1, 0xea, 0x20],
        WRMSR,
        &[0xb9, 0x01, 0x01, 0x00, 0xc0],
        WRMSR,
        &[0x0f, 0x20, 0xd8],
        &[0x0f, 0x32],
        RDTSC,
    ]);
    let c = translate64(&code, 0xffff_ffff_8000_0000).unwrap();
    check_cluster(
        &c,
        &code,
        0xffff_ffff_8000_0000,
        &TranslatorConfig::default(),
    );
    assert_eq!(
        exit_classes(&c),
        vec![
            ExitClass::MovToCr3,
            ExitClass::Wrmsr,
            ExitClass::Wrmsr,
            ExitClass::Rdmsr,
            ExitClass::Rdtsc
        ]
    );
    // `mov rax, cr3` does not exit by default (no CR3-store exiting): a filler.
    assert_eq!(c.insns[8].op, Op::MovFromCr { cr: 3, dst: 0 });
    assert_eq!(c.insns[8].exit_class, None);
    assert_eq!(c.insns.len(), 11);
}

#[test]
fn rtc_read_with_update_in_progress_wait() {
    // L: mov al,0x0a ; out 0x70,al ; in al,0x71 ; test al,0x80 ; jnz L ; mov al,0 ; out 0x70,al ; in al,0x71
    // The cluster starts at `out 0x70,al`; the back-edge leaves to `mov al,0x0a`.
    let code = asm(&[
        &[0xb0, 0x0a],
        &[0xe6, 0x70],
        &[0xe4, 0x71],
        &[0xa8, 0x80],
        &jnz(-10),
        &[0xb0, 0x00],
        &[0xe6, 0x70],
        &[0xe4, 0x71],
    ]);
    let c = translate64(&code[2..], 0x1002).unwrap();
    check_cluster(&c, &code[2..], 0x1002, &TranslatorConfig::default());
    assert_eq!(c.exiting_count(), 4);
    assert_eq!(
        c.insns[3].op,
        Op::Jcc {
            cond: crate::ir::Cond::Ne,
            target: Target::Exit(0x1000)
        }
    );
}

#[test]
fn instruction_pointers_do_not_wrap() {
    // 16-bit code at the top of the segment: the second cpuid would wrap.
    let code = asm(&[CPUID, CPUID]);
    assert_eq!(
        translate(
            &code,
            0xfffe,
            Bitness::B16,
            &ExitPolicy::default(),
            &TranslatorConfig::default()
        ),
        Err(NoCluster::CodeEnds)
    );
    let c = translate(
        &code,
        0xfffc,
        Bitness::B16,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    )
    .unwrap();
    assert_eq!(c.highest_end(), 0x10000);
    assert_eq!(
        translate(
            &code,
            0x10000,
            Bitness::B16,
            &ExitPolicy::default(),
            &TranslatorConfig::default()
        ),
        Err(NoCluster::RipOutOfRange)
    );
    assert_eq!(translate64(&code, u64::MAX - 3), Err(NoCluster::CodeEnds));
    assert_eq!(
        translate64(&code, u64::MAX - 1),
        Err(NoCluster::Undecodable)
    );
    assert!(translate64(&code, u64::MAX - 4).is_ok());
}

mod prop {
    use super::*;
    use proptest::prelude::*;

    /// Encodings that make clusters likely: exits, branches both ways, fillers,
    /// memory accesses, blockers.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let fixed: Vec<Vec<u8>> = vec![
            CPUID.to_vec(),
            RDTSC.to_vec(),
            WRMSR.to_vec(),
            HLT.to_vec(),
            NOP.to_vec(),
            INT3.to_vec(),
            IN_AL_DX.to_vec(),
            OUT_DX_AL.to_vec(),
            OUT_80_AL.to_vec(),
            LOAD_EAX_RBX.to_vec(),
            STORE_RBX_EAX.to_vec(),
            PUSH_RAX.to_vec(),
            POP_RAX.to_vec(),
            TEST_AL_20.to_vec(),
            DEC_ECX.to_vec(),
            MOV_CR3_RAX.to_vec(),
            MOV_CR0_RAX.to_vec(),
            vec![0xf3, 0x6c],
            vec![0x6e],
            vec![0xe4, 0x71],
            vec![0x0f, 0x32],
        ];
        prop_oneof![
            4 => proptest::sample::select(fixed),
            1 => any::<i8>().prop_map(jz),
            2 => (-24i8..0).prop_map(jnz),
            1 => any::<i8>().prop_map(jmp),
            1 => any::<i8>().prop_map(|r| vec![0xe2, r as u8]),
            1 => any::<i32>().prop_map(|r| {
                let mut v = vec![0x0f, 0x85];
                v.extend(r.to_le_bytes());
                v
            }),
            1 => proptest::collection::vec(any::<u8>(), 0..6),
        ]
    }

    fn rip() -> impl Strategy<Value = u64> {
        prop_oneof![
            any::<u64>(),
            0u64..0x2_0000,
            (0u64..64).prop_map(|d| 0xffffu64.wrapping_sub(d)),
            (0u64..64).prop_map(|d| 0xffff_ffffu64.wrapping_sub(d)),
            (0u64..64).prop_map(|d| u64::MAX - d),
        ]
    }

    /// A RIP the bitness can address: low, or close to the top of its range.
    fn rip_in(bitness: Bitness) -> impl Strategy<Value = u64> {
        let top: u64 = match bitness {
            Bitness::B16 => 0xffff,
            Bitness::B32 => 0xffff_ffff,
            Bitness::B64 => u64::MAX,
        };
        prop_oneof![
            3 => 0u64..0x1000,
            1 => (0u64..48).prop_map(move |d| top - d),
        ]
    }

    fn bitness() -> impl Strategy<Value = Bitness> {
        proptest::sample::select(vec![Bitness::B16, Bitness::B32, Bitness::B64])
    }

    fn config() -> impl Strategy<Value = TranslatorConfig> {
        (
            0usize..40,
            0usize..200,
            // Past the IR's limits too: the config is clamped to them.
            (0usize..5000, 0usize..40, 0usize..6),
            0u32..6,
            0u16..20,
            any::<bool>(),
        )
            .prop_map(
                |(look_ahead, max_insns, (bytes, ranges, depth), max_gap, cap, cr3)| {
                    TranslatorConfig {
                        look_ahead,
                        max_cluster_insns: max_insns,
                        max_region_bytes: bytes,
                        max_code_ranges: ranges,
                        max_call_depth: depth,
                        max_gap_memory_accesses: max_gap,
                        back_edge_cap: cap,
                        end_after_cr3_load: cr3,
                    }
                },
            )
    }

    fn check(code: &[u8], rip: u64, bitness: Bitness, config: &TranslatorConfig) {
        if let Ok(c) = translate(code, rip, bitness, &ExitPolicy::default(), config) {
            check_cluster(&c, code, rip, config);
            assert_eq!(c.bitness, bitness);
            for edge in &c.back_edges {
                if edge.cap.is_some() {
                    assert_eq!(edge.cap, Some(config.back_edge_cap));
                }
            }
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

        #[test]
        fn random_bytes_never_panic(code in proptest::collection::vec(any::<u8>(), 0..80), rip in rip(), bitness in bitness()) {
            check(&code, rip, bitness, &TranslatorConfig::default());
        }

        #[test]
        fn loops_with_heads_keep_cluster_promises(
            head in proptest::collection::vec(piece(), 0..5),
            first in proptest::sample::select(vec![CPUID, RDTSC, IN_AL_DX, OUT_80_AL, WRMSR]),
            pieces in proptest::collection::vec(piece(), 0..10),
            back_to in any::<proptest::sample::Index>(),
            config in config(),
        ) {
            let base = 0x40_0000u64;
            let mut code: Vec<u8> = head.concat();
            let entry = code.len();
            code.extend(first);
            for p in &pieces {
                code.extend(p);
            }
            // A JNZ back to a random byte at or before the entry.
            let target = back_to.index(entry + 1);
            let rel = target as i64 - (code.len() as i64 + 2);
            if let Ok(rel) = i8::try_from(rel) {
                code.extend(jnz(rel));
            }
            let rip = base + entry as u64;
            let policy = ExitPolicy::default();
            if let Ok(t) = translate_in(&code, base, rip, Bitness::B64, &policy, &config) {
                check_cluster_in(&t.cluster, &code, base, rip, &config);
            }
        }

        #[test]
        fn instruction_soup_keeps_cluster_promises(
            first in proptest::sample::select(vec![CPUID, RDTSC, IN_AL_DX, OUT_80_AL, WRMSR]),
            pieces in proptest::collection::vec(piece(), 0..24),
            (bitness, rip) in bitness().prop_flat_map(|b| (Just(b), rip_in(b))),
            config in config(),
        ) {
            let mut code = first.to_vec();
            for p in &pieces {
                code.extend(p);
            }
            check(&code, rip, bitness, &config);
        }
    }
}

// ---------------------------------------------------------------------------------
// Regions over the control-flow graph: calls, returns, indirect branches
// ---------------------------------------------------------------------------------

/// `rel32` from the end of a 5-byte CALL/JMP at `at` to `to`.
fn rel32(op: u8, at: u64, to: u64) -> Vec<u8> {
    let rel = (to as i64 - (at as i64 + 5)) as i32;
    let mut v = vec![op];
    v.extend_from_slice(&rel.to_le_bytes());
    v
}

#[test]
fn a_direct_call_takes_the_callee_in_and_returns_through_a_guard() {
    // 0x1000 in al,dx ; call 0x1100 ; out dx,al        (caller)
    // 0x1100 out 0x80,al ; ret                           (callee, far away)
    let mut code = vec![0x90u8; 0x110];
    code[0] = 0xec;
    code[1..6].copy_from_slice(&rel32(0xe8, 0x1001, 0x1100));
    code[6] = 0xee;
    code[0x100..0x102].copy_from_slice(OUT_80_AL);
    code[0x102] = 0xc3;
    let c = translate64(&code, 0x1000).unwrap();
    check_cluster(&c, &code, 0x1000, &TranslatorConfig::default());
    assert_eq!(c.exiting_count(), 3);
    assert_eq!(
        c.code.len(),
        2,
        "caller and callee, the padding between left out"
    );
    let call = c
        .insns
        .iter()
        .position(|i| matches!(i.op, Op::Call { .. }))
        .unwrap();
    let Op::Call { ret, target, .. } = c.insns[call].op else {
        unreachable!()
    };
    assert_eq!(ret, 0x1006);
    let Target::Insn(t) = target else {
        panic!("the callee is inside the region")
    };
    assert_eq!(c.insns[usize::from(t)].rip, 0x1100);
    let ret_at = c
        .insns
        .iter()
        .position(|i| matches!(i.op, Op::Ret { .. }))
        .unwrap();
    let guards: Vec<_> = c.guards_of(ret_at).collect();
    assert_eq!(guards.len(), 1);
    assert_eq!(
        guards[0].expect, 0x1006,
        "the RET goes on only to the call's continuation"
    );
    let Target::Insn(k) = guards[0].target else {
        panic!("the continuation is inside the region")
    };
    assert_eq!(c.insns[usize::from(k)].rip, 0x1006);
}

#[test]
fn a_callee_called_twice_is_laid_out_once_per_call_site() {
    // 0x2000 in al,dx ; call f ; call f ; hlt ;  f: out 0x80,al ; ret
    let mut code = Vec::new();
    code.extend(IN_AL_DX);
    code.extend(rel32(0xe8, 0x2001, 0x2010));
    code.extend(rel32(0xe8, 0x2006, 0x2010));
    code.extend(HLT);
    code.resize(0x10, 0x90);
    code.extend(OUT_80_AL);
    code.push(0xc3);
    let c = translate64(&code, 0x2000).unwrap();
    check_cluster(&c, &code, 0x2000, &TranslatorConfig::default());
    assert_eq!(c.exiting_count(), 4, "IN, the callee's OUT twice, the HLT");
    let rets: Vec<usize> = (0..c.insns.len())
        .filter(|&i| matches!(c.insns[i].op, Op::Ret { .. }))
        .collect();
    assert_eq!(rets.len(), 2);
    let expects: Vec<u64> = rets
        .iter()
        .map(|&r| c.guards_of(r).next().unwrap().expect)
        .collect();
    assert_eq!(expects, [0x2006, 0x200b]);
}

#[test]
fn recursion_and_depth_stop_following_calls() {
    // 0x3000 f: in al,dx ; call f ; ret
    let mut code = Vec::new();
    code.extend(IN_AL_DX);
    code.extend(rel32(0xe8, 0x3001, 0x3000));
    code.push(0xc3);
    let t = translate_explained(
        &code,
        0x3000,
        Bitness::B64,
        &ExitPolicy::default(),
        &TranslatorConfig::default(),
    );
    // The first call takes f in once more (the entry's own function is not known
    // to be a function); the second would recurse.
    if let Ok(t) = &t {
        check_cluster(&t.cluster, &code, 0x3000, &TranslatorConfig::default());
        assert!(t.cluster.insns.len() <= 6);
    }
    let flat = TranslatorConfig {
        max_call_depth: 0,
        ..TranslatorConfig::default()
    };
    let t = translate_explained(&code, 0x3000, Bitness::B64, &ExitPolicy::default(), &flat);
    assert_eq!(t.map(|t| t.cluster), Err(NoCluster::CallDepth));
}

#[test]
fn indirect_calls_and_returns_go_on_only_to_known_destinations() {
    // 0x4000 in al,dx ; call rax ; out dx,al ; ret
    // 0x4100 out 0x80,al ; ret
    let mut bytes = vec![0x90u8; 0x110];
    bytes[0] = 0xec;
    bytes[1..3].copy_from_slice(&[0xff, 0xd0]);
    bytes[3] = 0xee;
    bytes[4] = 0xc3;
    bytes[0x10] = 0xec; // 0x4010 in al,dx: where the function returns to
    bytes[0x100..0x102].copy_from_slice(OUT_80_AL);
    bytes[0x102] = 0xc3;
    let config = TranslatorConfig::default();
    // Nothing known: the region ends at the call, a guard with nothing to accept,
    // so that its first run reports where the call goes.
    let mut src = Pieces::new();
    src.add(0x4000, &bytes);
    let t = region64(&mut src, 0x4000, &config);
    assert_eq!(t.grows_no_further, NoCluster::IndirectUnknown);
    assert_eq!(t.cluster.insns.len(), 2);
    assert!(t.cluster.guards.is_empty());
    // The call's destination and the function's return address known.
    src.add_target(0x4001, 0x4100);
    src.add_target(0x4004, 0x4010);
    let t = region64(&mut src, 0x4000, &config);
    let c = &t.cluster;
    assert_eq!(c.exiting_count(), 4);
    let call = c.insns.iter().position(|i| i.rip == 0x4001).unwrap();
    let g: Vec<_> = c.guards_of(call).collect();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].expect, 0x4100);
    assert!(matches!(g[0].target, Target::Insn(_)));
    // The entry function's RET goes on to the known return address.
    let ret = c.insns.iter().position(|i| i.rip == 0x4004).unwrap();
    let g: Vec<_> = c.guards_of(ret).collect();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].expect, 0x4010);
    let Target::Insn(k) = g[0].target else {
        panic!("the return address is inside the region")
    };
    assert_eq!(c.insns[usize::from(k)].rip, 0x4010);
    crate::ir::validate(c).unwrap();
}

#[test]
fn a_poll_loop_entered_by_a_jump_to_its_test_clusters() {
    // gcc's usual layout: jmp to the test, body above, rare path after the loop.
    // 0x5000 out dx,al          (entry: write a byte)
    // 0x5001 jmp 0x5006         (to the test)
    // 0x5003 out 0x80,al        (body: delay)
    // 0x5005 nop
    // 0x5006 in al,dx           (test: read status)
    // 0x5007 test al,0x20
    // 0x5009 jz 0x5003
    // 0x500b out dx,al          (next byte)
    let code = asm(&[
        OUT_DX_AL,
        &jmp(3),
        OUT_80_AL,
        NOP,
        IN_AL_DX,
        TEST_AL_20,
        &jz(-8),
        OUT_DX_AL,
    ]);
    let c = translate64(&code, 0x5000).unwrap();
    check_cluster(&c, &code, 0x5000, &TranslatorConfig::default());
    assert_eq!(c.exiting_count(), 4);
    assert_eq!(shape(&c), Shape::Looping);
    assert!(
        c.back_edges.iter().all(|b| b.cap.is_none()),
        "every way round exits"
    );
}

#[test]
fn thunks_go_where_the_site_that_entered_them_goes() {
    // 0x6000 in al,dx ; jmp RT          (a return through Linux's return thunk)
    // 0x6010 out dx,al ; jmp IT          (the caller, then a tail call through a thunk)
    // 0x6020 RT: ret
    // 0x6030 IT: jmp *%rax               (__x86_indirect_thunk_rax, as patched)
    // 0x6040 out 0x80,al ; hlt           (the tail-called function)
    let mut bytes = vec![0x90u8; 0x50];
    bytes[0] = 0xec;
    bytes[1..6].copy_from_slice(&rel32(0xe9, 0x6001, 0x6020));
    bytes[0x10] = 0xee;
    bytes[0x11..0x16].copy_from_slice(&rel32(0xe9, 0x6011, 0x6030));
    bytes[0x20] = 0xc3;
    bytes[0x30..0x32].copy_from_slice(&[0xff, 0xe0]);
    bytes[0x40..0x42].copy_from_slice(OUT_80_AL);
    bytes[0x42] = 0xf4;
    let mut src = Pieces::new();
    src.add(0x6000, &bytes);
    src.add_thunk(0x6020, source::Thunk::Return);
    src.add_thunk(0x6030, source::Thunk::Indirect(crate::ir::RAX));
    // Known at the sites (the JMPs), as the AOT pass records them.
    src.add_target(0x6001, 0x6010);
    src.add_target(0x6011, 0x6040);
    let t = region64(&mut src, 0x6000, &TranslatorConfig::default());
    let c = &t.cluster;
    assert_eq!(c.exiting_count(), 4, "IN, OUT, OUT 0x80, HLT");
    let ret = c.insns.iter().position(|i| i.rip == 0x6020).unwrap();
    assert_eq!(
        c.guards_of(ret).map(|g| g.expect).collect::<Vec<_>>(),
        [0x6010]
    );
    let jmp = c.insns.iter().position(|i| i.rip == 0x6030).unwrap();
    assert_eq!(
        c.guards_of(jmp).map(|g| g.expect).collect::<Vec<_>>(),
        [0x6040]
    );
}

/// 0x7000 in al,dx ; call RP ; out 0x80,al ; hlt
/// 0x7020 RP: call 1f ; int3 x3 ; 1: mov %rax,(%rsp) ; ret   (the retpoline)
/// 0x7040 out dx,al ; then `jmp RT` (RT at 0x7060: ret, a return thunk) or `ret`
fn retpoline_code(return_thunk: bool) -> Vec<u8> {
    let mut bytes = vec![0xccu8; 0x70];
    bytes[0] = 0xec;
    bytes[1..6].copy_from_slice(&rel32(0xe8, 0x7001, 0x7020));
    bytes[6..8].copy_from_slice(OUT_80_AL);
    bytes[8] = 0xf4;
    bytes[0x20..0x25].copy_from_slice(&rel32(0xe8, 0x7020, 0x7028));
    bytes[0x28..0x2c].copy_from_slice(&[0x48, 0x89, 0x04, 0x24]);
    bytes[0x2c] = 0xc3;
    bytes[0x40] = 0xee;
    if return_thunk {
        bytes[0x41..0x46].copy_from_slice(&rel32(0xe9, 0x7041, 0x7060));
        bytes[0x60] = 0xc3;
    } else {
        bytes[0x41] = 0xc3;
    }
    bytes
}

#[test]
fn a_retpoline_goes_where_its_call_site_goes_and_learns_there() {
    let bytes = retpoline_code(true);
    let mut src = Pieces::new();
    src.add(0x7000, &bytes);
    // Found by their bytes, as the hypervisor finds them in guest memory.
    for at in [0x7020, 0x7060] {
        let t = resolve_thunk(&mut &src.clone(), at, Bitness::B64).unwrap();
        src.add_thunk(at, t);
    }
    assert_eq!(
        src.thunk(0x7020),
        Some(source::Thunk::Indirect(crate::ir::RAX))
    );
    assert_eq!(src.thunk(0x7060), Some(source::Thunk::Return));
    // The function pointer, known at the call site.
    src.add_target(0x7001, 0x7040);
    let t = region64(&mut src, 0x7000, &TranslatorConfig::default());
    let c = &t.cluster;
    assert_eq!(c.exiting_count(), 4, "IN, OUT in the callee, OUT 0x80, HLT");
    // The retpoline's RET goes to the call site's destination, not to the
    // speculation trap its inner call pushed, and learns at the call site.
    let ret = c.insns.iter().position(|i| i.rip == 0x702c).unwrap();
    assert_eq!(
        c.guards_of(ret).map(|g| g.expect).collect::<Vec<_>>(),
        [0x7040]
    );
    assert_eq!(c.learn_site(ret), Some(0x7001));
    // The callee's return through the return thunk goes back after the call.
    let rt = c.insns.iter().position(|i| i.rip == 0x7060).unwrap();
    assert_eq!(
        c.guards_of(rt).map(|g| g.expect).collect::<Vec<_>>(),
        [0x7006]
    );
    // An instruction outside any thunk learns where it is.
    let call = c.insns.iter().position(|i| i.rip == 0x7001).unwrap();
    assert_eq!(c.learn_site(call), Some(0x7001));
}

#[test]
fn a_retpolines_inner_call_is_no_level_of_the_call_depth() {
    // Calls allowed one deep: the call through the retpoline is that level; the
    // retpoline's own `call 1f` is not another.
    let bytes = retpoline_code(false);
    let mut src = Pieces::new();
    src.add(0x7000, &bytes);
    src.add_thunk(0x7020, source::Thunk::Indirect(crate::ir::RAX));
    src.add_target(0x7001, 0x7040);
    let config = TranslatorConfig {
        max_call_depth: 1,
        ..TranslatorConfig::default()
    };
    let t = region64(&mut src, 0x7000, &config);
    assert_eq!(
        t.cluster.exiting_count(),
        4,
        "IN, OUT in the callee, OUT 0x80, HLT"
    );
}

#[test]
fn a_region_with_more_loops_than_a_cluster_holds_is_shrunk_not_refused() {
    // 100 blocks `L: out dx,al ; nop ; loop L`, one after another: every LOOP is
    // a back-edge, more than a cluster may record.
    let mut bytes = Vec::new();
    for _ in 0..100 {
        bytes.extend_from_slice(&[0xee, 0x90, 0xe2, 0xfc]);
    }
    bytes.push(0xf4);
    let policy = ExitPolicy::default();
    let c = translate(
        &bytes,
        0x9000,
        Bitness::B64,
        &policy,
        &TranslatorConfig::default(),
    )
    .expect("a smaller region");
    crate::ir::validate(&c).unwrap();
    assert!(c.back_edges.len() <= limits::MAX_BACK_EDGES);
    assert!(c.exiting_count() >= 2, "{}", c.exiting_count());
    assert_eq!(c.entry_rip(), Some(0x9000));
    // Not just halved until it fits (1,024 -> 512 -> 256 -> 128 instructions: 42
    // loops): the largest that fits, to within 32 instructions (192: 64 loops).
    assert!(c.back_edges.len() > 52, "{}", c.back_edges.len());
}
