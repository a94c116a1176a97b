/* The configuration accessors, after Linux's drivers/pci/access.c and
 * arch/x86/pci/common.c: pci_read_config_*(dev) -> pci_bus_read_config_*(bus) ->
 * bus->ops->read (pci_root_ops: pci_read) -> raw_pci_read() ->
 * raw_pci_ops->read (pci_conf1_read). */
#include "pci.h"

int raw_pci_read(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		 u32 *val)
{
	if (domain == 0 && reg < 256 && raw_pci_ops)
		return raw_pci_ops->read(domain, bus, devfn, reg, len, val);
	return -1;
}

int raw_pci_write(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		  u32 val)
{
	if (domain == 0 && reg < 256 && raw_pci_ops)
		return raw_pci_ops->write(domain, bus, devfn, reg, len, val);
	return -1;
}

static int pci_read(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 *value)
{
	return raw_pci_read(0, bus->number, devfn, where, size, value);
}

static int pci_write(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 value)
{
	return raw_pci_write(0, bus->number, devfn, where, size, value);
}

struct pci_ops pci_root_ops = {
	.read = pci_read,
	.write = pci_write,
};

#define PCI_byte_BAD 0
#define PCI_word_BAD (pos & 1)
#define PCI_dword_BAD (pos & 3)

#define PCI_OP_READ(size, type, len)                                                     \
	int pci_bus_read_config_##size(struct pci_bus *bus, unsigned int devfn, int pos,  \
				       type *value)                                       \
	{                                                                                 \
		int res;                                                                  \
		u32 data = 0;                                                             \
		if (PCI_##size##_BAD)                                                     \
			return PCIBIOS_BAD_REGISTER_NUMBER;                               \
		res = bus->ops->read(bus, devfn, pos, len, &data);                        \
		if (res)                                                                  \
			*value = (type)~0;                                                \
		else                                                                      \
			*value = (type)data;                                              \
		return res;                                                               \
	}

#define PCI_OP_WRITE(size, type, len)                                                    \
	int pci_bus_write_config_##size(struct pci_bus *bus, unsigned int devfn, int pos, \
					type value)                                       \
	{                                                                                 \
		if (PCI_##size##_BAD)                                                     \
			return PCIBIOS_BAD_REGISTER_NUMBER;                               \
		return bus->ops->write(bus, devfn, pos, len, value);                      \
	}

PCI_OP_READ(byte, u8, 1)
PCI_OP_READ(word, u16, 2)
PCI_OP_READ(dword, u32, 4)
PCI_OP_WRITE(byte, u8, 1)
PCI_OP_WRITE(word, u16, 2)
PCI_OP_WRITE(dword, u32, 4)

int pci_read_config_byte(const struct pci_dev *dev, int where, u8 *val)
{
	return pci_bus_read_config_byte(dev->bus, dev->devfn, where, val);
}

int pci_read_config_word(const struct pci_dev *dev, int where, u16 *val)
{
	return pci_bus_read_config_word(dev->bus, dev->devfn, where, val);
}

int pci_read_config_dword(const struct pci_dev *dev, int where, u32 *val)
{
	return pci_bus_read_config_dword(dev->bus, dev->devfn, where, val);
}

int pci_write_config_byte(const struct pci_dev *dev, int where, u8 val)
{
	return pci_bus_write_config_byte(dev->bus, dev->devfn, where, val);
}

int pci_write_config_word(const struct pci_dev *dev, int where, u16 val)
{
	return pci_bus_write_config_word(dev->bus, dev->devfn, where, val);
}

int pci_write_config_dword(const struct pci_dev *dev, int where, u32 val)
{
	return pci_bus_write_config_dword(dev->bus, dev->devfn, where, val);
}
