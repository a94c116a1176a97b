//! `avex initramfs --busybox FILE -o OUT`: the initramfs avex boots Linux with.
//!
//! A cpio archive in the kernel's "newc" format (`070701` headers; see the kernel's
//! Documentation/driver-api/early-userspace/buffer-format.rst) holding a static
//! busybox (Debian's `busybox-static`, fetched by `scripts/linux-initramfs.sh`),
//! `/dev/console` (the kernel opens it for init before anything is mounted) and
//! `/init`, a shell script that runs the workload ([`INIT`]): every result line
//! starts with [`PREFIX`], so the lines can be compared between clustering modes
//! while the rest of the console (timings) may differ. It ends the run by writing
//! its status to the debug-exit port 0xf4 through `/dev/port`.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};

/// The prefix of every result line the init prints.
pub const PREFIX: &str = "avex-linux: ";

/// The init: mounts, the workload, the end through port 0xf4.
pub const INIT: &str = r#"#!/bin/sh
# avex's Linux workload. Result lines start with "avex-linux: " and must be the
# same in every clustering mode; nothing else on the console is compared.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mount -t tmpfs tmpfs /tmp
P="avex-linux:"
echo "$P start"
echo "$P kernel $(uname -r)"
# Interrupt lines by number and name (the counts differ from run to run).
awk '/^ *[0-9]+:/ { printf "%s irq %d %s\n", p, $1, $NF }' p="$P" /proc/interrupts
for d in /sys/bus/pci/devices/*; do
    [ -e "$d/vendor" ] && echo "$P pci ${d##*/} $(cat $d/vendor):$(cat $d/device) class $(cat $d/class)"
done
echo "$P rtc $(cat /sys/class/rtc/rtc0/date 2>/dev/null || echo none)"
# Interrupt-driven output through the tty layer after boot.
i=0
while [ $i -lt 200 ]; do
    echo "$P tty line $i of 200" > /dev/ttyS0
    i=$((i + 1))
done
seq 1 20000 > /tmp/numbers
echo "$P tmpfs $(md5sum /tmp/numbers | cut -d' ' -f1) $(wc -c < /tmp/numbers) bytes"
echo "$P done"
printf '\000' | dd of=/dev/port bs=1 seek=244 count=1 2>/dev/null
echo "$P the debug-exit port did not end the run"
poweroff -f
"#;

/// One member of the archive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Entry {
    Dir {
        path: String,
    },
    File {
        path: String,
        mode: u32,
        data: Vec<u8>,
    },
    Symlink {
        path: String,
        target: String,
    },
    CharDev {
        path: String,
        major: u32,
        minor: u32,
    },
}

const S_IFDIR: u32 = 0o040000;
const S_IFREG: u32 = 0o100000;
const S_IFLNK: u32 = 0o120000;
const S_IFCHR: u32 = 0o020000;

fn pad4(out: &mut Vec<u8>) {
    while !out.len().is_multiple_of(4) {
        out.push(0);
    }
}

fn member(out: &mut Vec<u8>, ino: u32, mode: u32, rdev: (u32, u32), name: &str, data: &[u8]) {
    let fields = [
        ino,
        mode,
        0, // uid
        0, // gid
        if mode & S_IFDIR == S_IFDIR { 2 } else { 1 },
        0, // mtime: fixed, so the archive is reproducible
        data.len() as u32,
        0,
        0,
        rdev.0,
        rdev.1,
        name.len() as u32 + 1,
        0, // check (unused by newc)
    ];
    out.extend_from_slice(b"070701");
    for f in fields {
        out.extend_from_slice(format!("{f:08x}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}

/// The newc archive of `entries`, in order, with the trailer. Paths are given
/// without a leading `/`.
pub fn newc(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        let ino = i as u32 + 1;
        match e {
            Entry::Dir { path } => member(&mut out, ino, S_IFDIR | 0o755, (0, 0), path, &[]),
            Entry::File { path, mode, data } => {
                member(&mut out, ino, S_IFREG | (mode & 0o7777), (0, 0), path, data)
            }
            Entry::Symlink { path, target } => member(
                &mut out,
                ino,
                S_IFLNK | 0o777,
                (0, 0),
                path,
                target.as_bytes(),
            ),
            Entry::CharDev { path, major, minor } => {
                member(&mut out, ino, S_IFCHR | 0o600, (*major, *minor), path, &[])
            }
        }
    }
    member(&mut out, 0, 0, (0, 0), "TRAILER!!!", &[]);
    out
}

/// The workload initramfs around `busybox` (a static x86-64 busybox).
pub fn linux_workload(busybox: &[u8]) -> Vec<u8> {
    let dir = |p: &str| Entry::Dir { path: p.into() };
    newc(&[
        dir("bin"),
        dir("dev"),
        dir("proc"),
        dir("sys"),
        dir("tmp"),
        Entry::CharDev {
            path: "dev/console".into(),
            major: 5,
            minor: 1,
        },
        Entry::File {
            path: "bin/busybox".into(),
            mode: 0o755,
            data: busybox.to_vec(),
        },
        Entry::Symlink {
            path: "bin/sh".into(),
            target: "busybox".into(),
        },
        Entry::File {
            path: "init".into(),
            mode: 0o755,
            data: INIT.as_bytes().to_vec(),
        },
    ])
}

#[derive(clap::Args, Debug)]
pub struct Args {
    /// A static x86-64 busybox (Debian's busybox-static: /bin/busybox).
    #[arg(long, value_name = "FILE")]
    pub busybox: PathBuf,
    /// Where to write the initramfs (an uncompressed newc cpio).
    #[arg(short, long, value_name = "FILE")]
    pub output: PathBuf,
}

pub fn main(args: Args) -> anyhow::Result<ExitCode> {
    let busybox = std::fs::read(&args.busybox)
        .with_context(|| format!("busybox {}: cannot read it", args.busybox.display()))?;
    if busybox.get(..4) != Some(b"\x7fELF") {
        bail!(
            "busybox {}: not an ELF executable (give the static busybox binary, e.g. \
             bin/busybox from Debian's busybox-static package)",
            args.busybox.display()
        );
    }
    let archive = linux_workload(&busybox);
    std::fs::write(&args.output, &archive)
        .with_context(|| format!("cannot write {}", args.output.display()))?;
    eprintln!(
        "avex: initramfs {} ({} bytes); its result lines start with {PREFIX:?}",
        args.output.display(),
        archive.len()
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A member read back: name, mode, (rdev major, minor), data.
    type Member = (String, u32, (u32, u32), Vec<u8>);

    /// Read a newc archive back, member by member.
    fn parse(mut b: &[u8]) -> Vec<Member> {
        let total = b.len();
        let mut out = Vec::new();
        loop {
            assert_eq!(&b[..6], b"070701");
            let field = |i: usize| {
                u32::from_str_radix(std::str::from_utf8(&b[6 + 8 * i..14 + 8 * i]).unwrap(), 16)
                    .unwrap()
            };
            let (mode, size, namesize) = (field(1), field(6) as usize, field(11) as usize);
            let rdev = (field(9), field(10));
            let name = String::from_utf8(b[110..110 + namesize - 1].to_vec()).unwrap();
            assert_eq!(b[110 + namesize - 1], 0);
            let data_at = (110 + namesize).next_multiple_of(4);
            let data = b[data_at..data_at + size].to_vec();
            let next = (data_at + size).next_multiple_of(4);
            assert_eq!((total - b.len() + next) % 4, 0);
            b = &b[next..];
            if name == "TRAILER!!!" {
                assert!(b.is_empty());
                return out;
            }
            out.push((name, mode, rdev, data));
        }
    }

    #[test]
    fn newc_members_read_back() {
        let a = linux_workload(b"\x7fELFbusybox");
        let m = parse(&a);
        let find = |n: &str| m.iter().find(|e| e.0 == n).unwrap().clone();
        assert_eq!(find("bin/busybox").3, b"\x7fELFbusybox");
        assert_eq!(find("bin/busybox").1, 0o100755);
        assert_eq!(find("dev/console").1, 0o020600);
        assert_eq!(find("dev/console").2, (5, 1));
        assert_eq!(find("bin/sh").3, b"busybox");
        assert_eq!(find("bin/sh").1 & 0o170000, 0o120000);
        assert_eq!(find("init").3, INIT.as_bytes());
        assert_eq!(find("proc").1, 0o040755);
        // Directories come before what they hold.
        let pos = |n: &str| m.iter().position(|e| e.0 == n).unwrap();
        assert!(pos("dev") < pos("dev/console") && pos("bin") < pos("bin/busybox"));
    }

    #[test]
    fn the_init_prints_prefixed_lines_and_ends_through_port_0xf4() {
        assert!(INIT.starts_with("#!/bin/sh\n"));
        assert!(INIT.contains("P=\"avex-linux:\""));
        assert_eq!(PREFIX, "avex-linux: ");
        assert!(INIT.contains("dd of=/dev/port bs=1 seek=244 count=1"));
    }
}
