//! Tests of [`super`].
use super::*;
use iced_x86::{Decoder, DecoderOptions};

fn decode(bitness: u32, bytes: &[u8]) -> Instruction {
    let mut decoder = Decoder::with_ip(bitness, bytes, 0x1000, DecoderOptions::NONE);
    let instr = decoder.decode();
    assert!(!instr.is_invalid(), "{bytes:02x?}");
    assert_eq!(instr.len(), bytes.len(), "{bytes:02x?}");
    instr
}

fn classify64(policy: &ExitPolicy, bytes: &[u8]) -> Option<ExitClass> {
    policy.classify(&decode(64, bytes))
}

#[test]
fn names_are_unique_upper_case_and_round_trip() {
    let mut seen = alloc::collections::BTreeSet::new();
    for class in ExitClass::ALL {
        let name = class.name();
        assert!(name
            .chars()
            .all(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || c == '_'));
        assert!(seen.insert(name), "duplicate {name}");
        assert_eq!(ExitClass::from_name(name), Some(class));
    }
    assert_eq!(ExitClass::MovToCr3.name(), "MOV_TO_CR3");
    assert_eq!(ExitClass::MovFromCr3.name(), "MOV_FROM_CR3");
    assert_eq!(ExitClass::from_name("out"), None);
}

#[test]
fn default_policy_classifies_every_form_of_the_driver_classes() {
    let p = ExitPolicy::default();
    let cases: &[(&[u8], Option<ExitClass>)] = &[
        (&[0xe4, 0x71], Some(ExitClass::In)),        // in al, 0x71
        (&[0x66, 0xe5, 0x40], Some(ExitClass::In)),  // in ax, 0x40
        (&[0xe5, 0x40], Some(ExitClass::In)),        // in eax, 0x40
        (&[0xec], Some(ExitClass::In)),              // in al, dx
        (&[0x66, 0xed], Some(ExitClass::In)),        // in ax, dx
        (&[0xed], Some(ExitClass::In)),              // in eax, dx
        (&[0xe6, 0x80], Some(ExitClass::Out)),       // out 0x80, al
        (&[0x66, 0xe7, 0x80], Some(ExitClass::Out)), // out 0x80, ax
        (&[0xe7, 0x80], Some(ExitClass::Out)),       // out 0x80, eax
        (&[0xee], Some(ExitClass::Out)),             // out dx, al
        (&[0x66, 0xef], Some(ExitClass::Out)),       // out dx, ax
        (&[0xef], Some(ExitClass::Out)),             // out dx, eax
        (&[0x6c], Some(ExitClass::Ins)),
        (&[0xf3, 0x66, 0x6d], Some(ExitClass::Ins)),
        (&[0x6d], Some(ExitClass::Ins)),
        (&[0x6e], Some(ExitClass::Outs)),
        (&[0x66, 0x6f], Some(ExitClass::Outs)),
        (&[0xf3, 0x6f], Some(ExitClass::Outs)),
        (&[0x0f, 0x32], Some(ExitClass::Rdmsr)),
        (&[0x0f, 0x30], Some(ExitClass::Wrmsr)),
        (&[0x0f, 0xa2], Some(ExitClass::Cpuid)),
        (&[0xf4], Some(ExitClass::Hlt)),
        (&[0x0f, 0x22, 0xc0], Some(ExitClass::MovToCr0)), // mov cr0, rax
        (&[0x0f, 0x20, 0xc0], None),                      // mov rax, cr0: read shadow
        (&[0x0f, 0x22, 0xd8], Some(ExitClass::MovToCr3)), // mov cr3, rax
        (&[0x0f, 0x20, 0xd8], None),                      // mov rax, cr3: no CR3-store exiting
        (&[0x0f, 0x22, 0xe0], Some(ExitClass::MovToCr4)),
        (&[0x0f, 0x20, 0xe0], None),
        (&[0x44, 0x0f, 0x22, 0xc0], None), // mov cr8, rax: CR8 exiting off
        (&[0x0f, 0x22, 0xd0], None),       // mov cr2, rax never exits
        (&[0x0f, 0x06], Some(ExitClass::Clts)),
        (&[0x0f, 0x01, 0xf0], Some(ExitClass::Lmsw)),
        (&[0x0f, 0x09], Some(ExitClass::Wbinvd)),
        (&[0xf3, 0x0f, 0x09], Some(ExitClass::Wbnoinvd)),
        (&[0x0f, 0x08], Some(ExitClass::Invd)),
        (&[0x0f, 0x01, 0xd1], Some(ExitClass::Xsetbv)),
        (&[0x0f, 0x01, 0xd0], None), // xgetbv
        (&[0x0f, 0x31], Some(ExitClass::Rdtsc)),
        (&[0x0f, 0x01, 0xf9], Some(ExitClass::Rdtscp)),
        (&[0x0f, 0x33], Some(ExitClass::Rdpmc)),
        (&[0x0f, 0x01, 0xc1], Some(ExitClass::Vmcall)),
        (&[0x0f, 0x01, 0xc4], Some(ExitClass::VmxInstruction)), // vmxoff
        (&[0x0f, 0x01, 0xc8], Some(ExitClass::Monitor)),
        (&[0x0f, 0x01, 0xc9], Some(ExitClass::Mwait)),
        (&[0x0f, 0x23, 0xf8], Some(ExitClass::MovToDr)), // mov dr7, rax
        (&[0x0f, 0x21, 0xf8], Some(ExitClass::MovFromDr)), // mov rax, dr7
        (&[0x0f, 0x01, 0x3f], None),                     // invlpg: off with EPT
        (&[0x0f, 0x01, 0x10], None),                     // lgdt: descriptor-table exiting off
        (&[0xf3, 0x90], None),                           // pause: off
        (&[0x0f, 0xc7, 0xf0], None),                     // rdrand eax: off
        (&[0x90], None),
        (&[0x48, 0x89, 0xd8], None),
    ];
    for &(bytes, expected) in cases {
        assert_eq!(classify64(&p, bytes), expected, "{bytes:02x?}");
    }
}

#[test]
fn port_ranges_decide_immediate_ports_and_any_port_decides_dx() {
    let p = ExitPolicy::builder()
        .intercept_ports(0x3f8, 0x3ff)
        .intercept_ports(0x70, 0x70)
        .build();
    assert_eq!(classify64(&p, &[0xe4, 0x70]), Some(ExitClass::In));
    assert_eq!(classify64(&p, &[0xe4, 0x71]), None);
    // in ax, 0x6f touches 0x6f and 0x70: the second byte is intercepted
    assert_eq!(classify64(&p, &[0x66, 0xe5, 0x6f]), Some(ExitClass::In));
    assert_eq!(classify64(&p, &[0xe6, 0x80]), None);
    assert_eq!(classify64(&p, &[0xee]), Some(ExitClass::Out));
    assert_eq!(classify64(&p, &[0x6e]), Some(ExitClass::Outs));
    assert!(p.port_exits(0x3fd, 1));
    assert!(!p.port_exits(0x3f7, 1));
    assert!(p.port_exits(0x3f7, 2));

    let none = ExitPolicy::builder().build();
    assert_eq!(classify64(&none, &[0xee]), None);
    assert_eq!(classify64(&none, &[0xe4, 0x70]), None);
    let unconditional = ExitPolicy::builder()
        .enable(VmcsControl::UnconditionalIoExiting)
        .build();
    assert_eq!(
        classify64(&unconditional, &[0xe4, 0x70]),
        Some(ExitClass::In)
    );
    let no_bitmaps = ExitPolicy::builder()
        .intercept_all_ports()
        .disable(VmcsControl::UseIoBitmaps)
        .build();
    assert_eq!(classify64(&no_bitmaps, &[0xec]), None);
}

#[test]
fn msrs_controls_and_cr_masks() {
    let none = ExitPolicy::builder().build();
    assert_eq!(classify64(&none, &[0x0f, 0x32]), None);
    assert!(
        none.msr_exits(0x4000_0000),
        "outside the bitmaps exits on hardware"
    );
    assert!(!none.msr_exits(0x10));
    let fs_base = ExitPolicy::builder()
        .intercept_msrs(0xc000_0100, 0xc000_0100)
        .build();
    assert_eq!(classify64(&fs_base, &[0x0f, 0x30]), Some(ExitClass::Wrmsr));
    assert!(fs_base.msr_exits(0xc000_0100));
    assert!(!fs_base.msr_exits(0xc000_0101));
    let no_bitmaps = ExitPolicy::builder()
        .disable(VmcsControl::UseMsrBitmaps)
        .build();
    assert_eq!(
        classify64(&no_bitmaps, &[0x0f, 0x32]),
        Some(ExitClass::Rdmsr)
    );

    // CPUID exits whatever the policy
    assert_eq!(classify64(&none, &[0x0f, 0xa2]), Some(ExitClass::Cpuid));
    assert_eq!(classify64(&none, &[0xf4]), None);
    assert_eq!(classify64(&none, &[0x0f, 0x22, 0xc0]), None);
    let cr3_store = ExitPolicy::builder()
        .enable(VmcsControl::Cr3StoreExiting)
        .build();
    assert_eq!(
        classify64(&cr3_store, &[0x0f, 0x20, 0xd8]),
        Some(ExitClass::MovFromCr3)
    );
    assert_eq!(classify64(&cr3_store, &[0x0f, 0x22, 0xd8]), None);

    // CLTS exits only when CR0.TS is owned; LMSW when one of CR0[3:0] is
    let pg_only = ExitPolicy::builder().cr0_guest_host_mask(1 << 31).build();
    assert_eq!(
        classify64(&pg_only, &[0x0f, 0x22, 0xc0]),
        Some(ExitClass::MovToCr0)
    );
    assert_eq!(classify64(&pg_only, &[0x0f, 0x06]), None);
    assert_eq!(classify64(&pg_only, &[0x0f, 0x01, 0xf0]), None);
    let ts = ExitPolicy::builder().cr0_guest_host_mask(cr0::TS).build();
    assert_eq!(classify64(&ts, &[0x0f, 0x06]), Some(ExitClass::Clts));
    assert_eq!(classify64(&ts, &[0x0f, 0x01, 0xf0]), Some(ExitClass::Lmsw));
    let cr4 = ExitPolicy::builder().cr4_guest_host_mask(1 << 5).build();
    assert_eq!(
        classify64(&cr4, &[0x0f, 0x22, 0xe0]),
        Some(ExitClass::MovToCr4)
    );
    assert_eq!(classify64(&cr4, &[0x0f, 0x22, 0xc0]), None);
}

#[test]
fn every_class_has_a_consistent_exit_kind() {
    let everything = VmcsControl::ALL
        .iter()
        .fold(ExitPolicy::default().to_builder(), |b, &c| b.enable(c))
        .build();
    let nothing = ExitPolicy::builder()
        .disable(VmcsControl::UseIoBitmaps)
        .build();
    for class in ExitClass::ALL {
        match class.exit_kind() {
            ExitKind::Always => assert!(nothing.class_exits(class), "{class:?}"),
            ExitKind::Never => assert!(!everything.class_exits(class), "{class:?}"),
            ExitKind::Control(_) | ExitKind::OwnedCrBits { .. } => {
                assert!(everything.class_exits(class), "{class:?}");
                if !matches!(class, ExitClass::Rdmsr | ExitClass::Wrmsr) {
                    assert!(!nothing.class_exits(class), "{class:?}");
                }
            }
        }
    }
}

#[test]
fn weak_instructions_access_memory_through_operands() {
    let p = ExitPolicy::default();
    assert!(p.is_weak(&decode(64, &[0x8b, 0x03]))); // mov eax, [rbx]
    assert!(p.is_weak(&decode(64, &[0x89, 0x03]))); // mov [rbx], eax
    assert!(p.is_weak(&decode(64, &[0x83, 0x03, 0x01]))); // add dword [rbx], 1
    assert!(p.is_weak(&decode(64, &[0xf3, 0xa4]))); // rep movsb
    assert!(!p.is_weak(&decode(64, &[0x8d, 0x03]))); // lea eax, [rbx]
    assert!(!p.is_weak(&decode(64, &[0x0f, 0x1f, 0x44, 0x00, 0x00]))); // nop [rax+rax]
    assert!(!p.is_weak(&decode(64, &[0x0f, 0x01, 0x3f]))); // invlpg [rdi]
    assert!(!p.is_weak(&decode(64, &[0x53]))); // push rbx: stack
    assert!(!p.is_weak(&decode(64, &[0x89, 0xd8]))); // mov eax, ebx
}

#[test]
fn range_sets_normalize() {
    let mut set = RangeSet::default();
    set.insert(10, 20);
    set.insert(21, 30); // adjacent: merged
    set.insert(5, 12);
    set.insert(40, 50);
    assert_eq!(set.ranges(), &[(5, 30), (40, 50)]);
    set.remove(15, 45);
    assert_eq!(set.ranges(), &[(5, 14), (46, 50)]);
    set.insert(0, u32::MAX);
    assert_eq!(set.ranges(), &[(0, u32::MAX)]);
    set.remove(0, 0);
    set.remove(u32::MAX, u32::MAX);
    assert_eq!(set.ranges(), &[(1, u32::MAX - 1)]);
    assert_eq!(
        RangeSet::from(alloc::vec![(9, 3), (1, 2)]).ranges(),
        &[(1, 9)]
    );
}

#[test]
fn fingerprint_identifies_the_policy_and_survives_serialization() {
    let default = ExitPolicy::default();
    assert_eq!(default.fingerprint(), ExitPolicy::default().fingerprint());
    let other = default.to_builder().pass_through_ports(0x80, 0x80).build();
    assert_ne!(default.fingerprint(), other.fingerprint());
    let bytes = postcard::to_allocvec(&other).unwrap();
    let back: ExitPolicy = postcard::from_bytes(&bytes).unwrap();
    assert_eq!(back, other);
    assert_eq!(back.fingerprint(), other.fingerprint());
    // The same set stated in pieces is the same policy.
    let pieces = ExitPolicy::builder()
        .intercept_ports(0, 0x7f)
        .intercept_ports(0x81, 0xffff)
        .build();
    let whole = ExitPolicy::builder()
        .intercept_all_ports()
        .pass_through_ports(0x80, 0x80)
        .build();
    assert_eq!(pieces, whole);
    assert_eq!(pieces.fingerprint(), whole.fingerprint());
}
