/* cpci: PCI enumeration shaped like Linux's drivers/pci/probe.c. Bus 0 is
 * scanned slot by slot (functions 1-7 only behind a multi-function header);
 * each function found is set up (header type, class, revision) and its BARs
 * (6 for a normal header, 2 for a bridge, then the ROM) sized as
 * __pci_read_base() does: decoding off, save, write all ones, read the mask,
 * restore (both halves of a 64-bit BAR), decoding back on. Then, as
 * pcibios_fixup_peer_bridges() does with "pci=lastbus=255", buses 1-255 are
 * probed for peer host bridges, one vendor-ID read per slot, so that the
 * guest's exits are configuration accesses. */
#include "pci.h"

#define LAST_BUS 255
#define MAX_DEVS 64

static struct pci_bus root_bus = { .ops = &pci_root_ops, .number = 0 };
static struct pci_dev devs[MAX_DEVS];
static unsigned int nr_devs, nr_bars;
static u64 checksum = 0xcbf29ce484222325ull;

static void fold(u64 v)
{
	for (int i = 0; i < 8; i++, v >>= 8)
		checksum = (checksum ^ (v & 0xff)) * 0x100000001b3ull;
}

static u64 pci_size(u64 base, u64 maxbase, u64 mask)
{
	u64 size = mask & maxbase;

	if (!size)
		return 0;
	size = size & ~(size - 1);
	if (base == maxbase && ((base | (size - 1)) & mask) != mask)
		return 0;
	return size;
}

static void print_resource(const struct pci_dev *dev, int pos, const struct resource *res)
{
	printk("pci 0000:%02x:%02x.%u: reg 0x%02x: [%s 0x%08llx-0x%08llx%s%s]\n",
	       dev->bus->number, PCI_SLOT(dev->devfn), PCI_FUNC(dev->devfn), pos,
	       res->flags & IORESOURCE_IO ? "io " : "mem", (unsigned long long)res->start,
	       (unsigned long long)res->end, res->flags & IORESOURCE_MEM_64 ? " 64bit" : "",
	       res->flags & IORESOURCE_PREFETCH ? " pref" : "");
}

/* Returns 1 if the BAR was the lower half of a 64-bit one. */
static int __pci_read_base(struct pci_dev *dev, int rom, struct resource *res, int pos)
{
	u32 l = 0, sz = 0, mask = rom ? PCI_ROM_ADDRESS_MASK : ~0U;
	u64 l64, sz64, mask64;
	u16 orig_cmd;

	/* No printks while decoding is disabled! */
	pci_read_config_word(dev, PCI_COMMAND, &orig_cmd);
	if (orig_cmd & PCI_COMMAND_DECODE_ENABLE)
		pci_write_config_word(dev, PCI_COMMAND, orig_cmd & ~PCI_COMMAND_DECODE_ENABLE);

	pci_read_config_dword(dev, pos, &l);
	pci_write_config_dword(dev, pos, l | mask);
	pci_read_config_dword(dev, pos, &sz);
	pci_write_config_dword(dev, pos, l);

	if (PCI_POSSIBLE_ERROR(sz))
		sz = 0;
	if (PCI_POSSIBLE_ERROR(l))
		l = 0;

	if (rom) {
		res->flags = IORESOURCE_MEM | IORESOURCE_PREFETCH | IORESOURCE_READONLY;
		l64 = l & PCI_ROM_ADDRESS_MASK;
		sz64 = sz & PCI_ROM_ADDRESS_MASK;
		mask64 = PCI_ROM_ADDRESS_MASK;
	} else if (l & PCI_BASE_ADDRESS_SPACE_IO) {
		res->flags = IORESOURCE_IO;
		l64 = l & PCI_BASE_ADDRESS_IO_MASK;
		sz64 = sz & PCI_BASE_ADDRESS_IO_MASK;
		mask64 = PCI_BASE_ADDRESS_IO_MASK & 0xffff;
	} else {
		res->flags = IORESOURCE_MEM;
		if (l & PCI_BASE_ADDRESS_MEM_PREFETCH)
			res->flags |= IORESOURCE_PREFETCH;
		if ((l & PCI_BASE_ADDRESS_MEM_TYPE_MASK) == PCI_BASE_ADDRESS_MEM_TYPE_64)
			res->flags |= IORESOURCE_MEM_64;
		l64 = l & PCI_BASE_ADDRESS_MEM_MASK;
		sz64 = sz & PCI_BASE_ADDRESS_MEM_MASK;
		mask64 = PCI_BASE_ADDRESS_MEM_MASK;
	}

	if (res->flags & IORESOURCE_MEM_64) {
		pci_read_config_dword(dev, pos + 4, &l);
		pci_write_config_dword(dev, pos + 4, ~0U);
		pci_read_config_dword(dev, pos + 4, &sz);
		pci_write_config_dword(dev, pos + 4, l);
		l64 |= (u64)l << 32;
		sz64 |= (u64)sz << 32;
		mask64 |= ~0ULL << 32;
	}

	if (orig_cmd & PCI_COMMAND_DECODE_ENABLE)
		pci_write_config_word(dev, PCI_COMMAND, orig_cmd);

	sz64 = sz64 ? pci_size(l64, sz64, mask64) : 0;
	if (!sz64) {
		res->flags = 0;
	} else {
		res->start = l64;
		res->end = l64 + sz64 - 1;
		nr_bars++;
		fold(pos);
		fold(sz64);
		print_resource(dev, pos, res);
	}
	return (res->flags & IORESOURCE_MEM_64) ? 1 : 0;
}

static void pci_read_bases(struct pci_dev *dev, unsigned int howmany, int rom)
{
	unsigned int pos;

	for (pos = 0; pos < howmany; pos++)
		pos += __pci_read_base(dev, 0, &dev->resource[pos], PCI_BASE_ADDRESS_0 + (pos << 2));
	if (rom)
		__pci_read_base(dev, 1, &dev->resource[PCI_NUM_RESOURCES - 1], rom);
}

/* Anything but all ones, all zeroes or a half of either answers. */
static int pci_bus_read_dev_vendor_id(struct pci_bus *bus, unsigned int devfn, u32 *l)
{
	if (pci_bus_read_config_dword(bus, devfn, PCI_VENDOR_ID, l))
		return 0;
	if (PCI_POSSIBLE_ERROR(*l) || *l == 0x00000000 || *l == 0x0000ffff || *l == 0xffff0000)
		return 0;
	return 1;
}

static int pci_setup_device(struct pci_dev *dev)
{
	u32 class;
	u8 hdr_type;

	if (pci_read_config_byte(dev, PCI_HEADER_TYPE, &hdr_type))
		return -1;
	dev->hdr_type = hdr_type & 0x7f;
	dev->multifunction = !!(hdr_type & 0x80);
	pci_read_config_dword(dev, PCI_CLASS_REVISION, &class);
	dev->revision = class & 0xff;
	dev->class = class >> 8;

	printk("pci 0000:%02x:%02x.%u: [%04x:%04x] type %02x class 0x%06x rev %02x\n",
	       dev->bus->number, PCI_SLOT(dev->devfn), PCI_FUNC(dev->devfn), dev->vendor,
	       dev->device, dev->hdr_type, dev->class, dev->revision);
	fold(dev->devfn);
	fold((u64)dev->vendor << 48 | (u64)dev->device << 32 | class);

	switch (dev->hdr_type) {
	case PCI_HEADER_TYPE_NORMAL:
		pci_read_bases(dev, 6, PCI_ROM_ADDRESS);
		break;
	case PCI_HEADER_TYPE_BRIDGE:
		pci_read_bases(dev, 2, PCI_ROM_ADDRESS1);
		break;
	default:
		printk("pci 0000:%02x:%02x.%u: unknown header type %02x, ignoring device\n",
		       dev->bus->number, PCI_SLOT(dev->devfn), PCI_FUNC(dev->devfn), dev->hdr_type);
		return -1;
	}
	return 0;
}

static struct pci_dev *pci_scan_device(struct pci_bus *bus, unsigned int devfn)
{
	struct pci_dev *dev;
	u32 l;

	if (!pci_bus_read_dev_vendor_id(bus, devfn, &l))
		return NULL;
	if (nr_devs == MAX_DEVS)
		panic("cpci: more than %u functions", MAX_DEVS);
	dev = &devs[nr_devs];
	dev->bus = bus;
	dev->devfn = devfn;
	dev->vendor = l & 0xffff;
	dev->device = l >> 16;
	if (pci_setup_device(dev))
		return NULL;
	nr_devs++;
	return dev;
}

/* The next function to scan: functions 1-7 only behind a multi-function
 * function 0 (an absent function in between does not end the slot). */
static int next_fn(const struct pci_dev *dev, int fn)
{
	if (fn >= 7)
		return -1;
	if (dev && !dev->multifunction)
		return -1;
	return fn + 1;
}

static unsigned int pci_scan_slot(struct pci_bus *bus, unsigned int devfn)
{
	unsigned int nr = 0;
	int fn = 0;

	do {
		struct pci_dev *dev = pci_scan_device(bus, devfn + fn);

		if (dev) {
			nr++;
			if (fn > 0)
				dev->multifunction = 1;
		} else if (fn == 0) {
			break;
		}
		fn = next_fn(dev, fn);
	} while (fn >= 0);
	return nr;
}

static unsigned int pci_scan_child_bus(struct pci_bus *bus)
{
	unsigned int devfn, found = 0;

	for (devfn = 0; devfn < 256; devfn += 8)
		found += pci_scan_slot(bus, devfn);
	return found;
}

/* A device answering on a bus nobody bridged to is a peer host bridge's. */
static int pcibios_scan_specific_bus(unsigned int busn)
{
	unsigned int devfn;
	u32 l;

	for (devfn = 0; devfn < 256; devfn += 8) {
		if (!raw_pci_read(0, busn, devfn, PCI_VENDOR_ID, 2, &l) && l != 0x0000 &&
		    l != 0xffff) {
			printk("PCI: Discovered peer bus %02x\n", busn);
			return 1;
		}
	}
	return 0;
}

int guest_main(void)
{
	unsigned int busn, found, peers = 0;

	if (!pci_direct_probe()) {
		printk("cpci: no PCI configuration mechanism #1\n");
		return EXIT_FAILED;
	}
	printk("PCI: Using configuration type 1 for base access\n");
	found = pci_scan_child_bus(&root_bus);
	for (busn = 1; busn <= LAST_BUS; busn++)
		peers += pcibios_scan_specific_bus(busn);
	fold(peers);
	printk("cpci: bus 00: %u functions, %u BARs sized; buses 01-%02x: %u peer buses\n", found,
	       nr_bars, LAST_BUS, peers);
	printk("cpci: checksum 0x%016llx\n", (unsigned long long)checksum);
	printk("cpci: ok\n");
	return EXIT_OK;
}
