//! What the bundled C guests (guest-kernels/c/) must print, recomputed here, and
//! which of them only the run-time guard can cluster.

/// C guests whose every exiting instruction sits in a small function reached
/// through a function pointer the guest sets at run time (`port->serial_in`): the
/// AOT pass knows no destination for them, so no AOT cluster forms; the regions
/// the hypervisor builds and the destinations its guards learn cluster them. Tests
/// require fewer exits with clusters for every guest, AOT clusters for the others.
pub const RUN_TIME_DESTINATIONS: [&str; 3] = ["c8250", "c8250-os", "c8250-retpoline"];

/// The bytes `c8250` (and `c8250-os`, `c8250-retpoline`) send on COM1 on any platform whose UART
/// autoconfigures as a 16550A, `\n` sent as `\r\n` as the 8250 console does.
pub fn c8250_output() -> Vec<u8> {
    let mut text =
        String::from("c8250: ttyS0 at I/O 0x3f8 (irq = 4, base_baud = 115200) is a 16550A\n");
    let (mut crc, mut sum) = (0u32, 0u32);
    for i in 0..256u32 {
        let x = i.wrapping_mul(2_654_435_761);
        crc = crc32(crc, &x.to_le_bytes());
        sum = (sum + (x >> 20)) % 1_000_000;
        text += &format!("{i:03} {x:08x} {crc:08x} {sum:6}\n");
    }
    let bytes = text.len();
    text += &format!("c8250: 256 lines, {bytes} bytes\nc8250: ok\n");
    text.replace('\n', "\r\n").into_bytes()
}

/// CRC-32 (IEEE, reflected) continued from `crc`.
fn crc32(crc: u32, bytes: &[u8]) -> u32 {
    let mut c = !crc;
    for &b in bytes {
        c ^= u32::from(b);
        for _ in 0..8 {
            c = (c >> 1) ^ (0xedb8_8320 & (c & 1).wrapping_neg());
        }
    }
    !c
}
