/* PCI configuration mechanism #1, after Linux's arch/x86/pci/direct.c: the
 * address of bus/devfn/register goes to 0xCF8, the data moves through
 * 0xCFC-0xCFF; pci_direct_probe() checks that the mechanism works (0xCF8 reads
 * back what was written, and bus 0 holds a host bridge, a VGA device or an Intel
 * or Compaq function) before making it raw_pci_ops. */
#include "io.h"
#include "pci.h"

#define PCI_CONF1_ADDRESS(bus, devfn, reg)                                               \
	(0x80000000 | ((reg & 0xf00) << 16) | (bus << 16) | (devfn << 8) | (reg & 0xfc))

const struct pci_raw_ops *raw_pci_ops;

static int pci_conf1_read(unsigned int seg, unsigned int bus, unsigned int devfn, int reg,
			  int len, u32 *value)
{
	if (seg || bus > 255 || devfn > 255 || reg > 4095) {
		*value = -1;
		return -1;
	}

	outl(PCI_CONF1_ADDRESS(bus, devfn, reg), 0xcf8);

	switch (len) {
	case 1:
		*value = inb(0xcfc + (reg & 3));
		break;
	case 2:
		*value = inw(0xcfc + (reg & 2));
		break;
	case 4:
		*value = inl(0xcfc);
		break;
	}
	return 0;
}

static int pci_conf1_write(unsigned int seg, unsigned int bus, unsigned int devfn, int reg,
			   int len, u32 value)
{
	if (seg || bus > 255 || devfn > 255 || reg > 4095)
		return -1;

	outl(PCI_CONF1_ADDRESS(bus, devfn, reg), 0xcf8);

	switch (len) {
	case 1:
		outb((u8)value, 0xcfc + (reg & 3));
		break;
	case 2:
		outw((u16)value, 0xcfc + (reg & 2));
		break;
	case 4:
		outl(value, 0xcfc);
		break;
	}
	return 0;
}

static const struct pci_raw_ops pci_direct_conf1 = {
	.read = pci_conf1_read,
	.write = pci_conf1_write,
};

/* Something that looks like a PCI bus 0 behind these ops. */
static int pci_sanity_check(const struct pci_raw_ops *o)
{
	u32 x = 0;
	int devfn;

	for (devfn = 0; devfn < 0x100; devfn++) {
		if (o->read(0, 0, devfn, PCI_CLASS_DEVICE, 2, &x))
			continue;
		if (x == PCI_CLASS_BRIDGE_HOST || x == PCI_CLASS_DISPLAY_VGA)
			return 1;
		if (o->read(0, 0, devfn, PCI_VENDOR_ID, 2, &x))
			continue;
		if (x == PCI_VENDOR_ID_INTEL || x == PCI_VENDOR_ID_COMPAQ)
			return 1;
	}
	return 0;
}

static int pci_check_type1(void)
{
	unsigned int tmp;
	int works = 0;

	outb(0x01, 0xcfb);
	tmp = inl(0xcf8);
	outl(0x80000000, 0xcf8);
	if (inl(0xcf8) == 0x80000000 && pci_sanity_check(&pci_direct_conf1))
		works = 1;
	outl(tmp, 0xcf8);
	return works;
}

int pci_direct_probe(void)
{
	if (!pci_check_type1())
		return 0;
	raw_pci_ops = &pci_direct_conf1;
	return 1;
}
