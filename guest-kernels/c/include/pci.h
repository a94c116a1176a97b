/* PCI configuration access, after Linux: the architecture's raw operations
 * (arch/x86/pci/direct.c, type 1 through 0xCF8/0xCFC) behind raw_pci_ops, the
 * root bus's pci_ops on top of them, and the pci_{bus_,}{read,write}_config_*
 * accessors drivers call (drivers/pci/access.c). */
#ifndef AVEX_PCI_H
#define AVEX_PCI_H

#include "kernel.h"

#define PCI_VENDOR_ID 0x00
#define PCI_DEVICE_ID 0x02
#define PCI_COMMAND 0x04
#define PCI_COMMAND_IO 0x1
#define PCI_COMMAND_MEMORY 0x2
#define PCI_COMMAND_DECODE_ENABLE (PCI_COMMAND_MEMORY | PCI_COMMAND_IO)
#define PCI_CLASS_REVISION 0x08
#define PCI_CLASS_DEVICE 0x0a
#define PCI_HEADER_TYPE 0x0e
#define PCI_HEADER_TYPE_NORMAL 0
#define PCI_HEADER_TYPE_BRIDGE 1
#define PCI_BASE_ADDRESS_0 0x10
#define PCI_BASE_ADDRESS_SPACE_IO 0x01
#define PCI_BASE_ADDRESS_MEM_TYPE_MASK 0x06
#define PCI_BASE_ADDRESS_MEM_TYPE_64 0x04
#define PCI_BASE_ADDRESS_MEM_PREFETCH 0x08
#define PCI_BASE_ADDRESS_MEM_MASK (~0x0fU)
#define PCI_BASE_ADDRESS_IO_MASK (~0x03U)
#define PCI_ROM_ADDRESS 0x30
#define PCI_ROM_ADDRESS1 0x38
#define PCI_ROM_ADDRESS_MASK (~0x7ffU)

#define PCI_CLASS_BRIDGE_HOST 0x0600
#define PCI_CLASS_DISPLAY_VGA 0x0300
#define PCI_VENDOR_ID_INTEL 0x8086
#define PCI_VENDOR_ID_COMPAQ 0x0e11

#define PCI_DEVFN(slot, func) ((((slot) & 0x1f) << 3) | ((func) & 0x07))
#define PCI_SLOT(devfn) (((devfn) >> 3) & 0x1f)
#define PCI_FUNC(devfn) ((devfn) & 0x07)

#define PCIBIOS_SUCCESSFUL 0x00
#define PCIBIOS_BAD_REGISTER_NUMBER 0x87
#define PCI_POSSIBLE_ERROR(val) ((val) == (typeof(val))~0)

struct pci_raw_ops {
	int (*read)(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		    u32 *val);
	int (*write)(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		     u32 val);
};

struct pci_bus;

struct pci_ops {
	int (*read)(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 *val);
	int (*write)(struct pci_bus *bus, unsigned int devfn, int where, int size, u32 val);
};

struct pci_bus {
	struct pci_ops *ops;
	unsigned char number;
};

#define IORESOURCE_IO 0x00000100
#define IORESOURCE_MEM 0x00000200
#define IORESOURCE_PREFETCH 0x00002000
#define IORESOURCE_READONLY 0x00004000
#define IORESOURCE_MEM_64 0x00100000

struct resource {
	u64 start;
	u64 end;
	unsigned long flags;
};

#define PCI_NUM_RESOURCES 7

struct pci_dev {
	struct pci_bus *bus;
	unsigned int devfn;
	u16 vendor;
	u16 device;
	u32 class; /* class << 8 | prog-if */
	u8 revision;
	u8 hdr_type;
	u8 multifunction;
	struct resource resource[PCI_NUM_RESOURCES];
};

/* drivers/pci_direct.c */
extern const struct pci_raw_ops *raw_pci_ops;
int pci_direct_probe(void);

/* drivers/pci_access.c */
extern struct pci_ops pci_root_ops;
int raw_pci_read(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		 u32 *val);
int raw_pci_write(unsigned int domain, unsigned int bus, unsigned int devfn, int reg, int len,
		  u32 val);
int pci_bus_read_config_byte(struct pci_bus *bus, unsigned int devfn, int where, u8 *val);
int pci_bus_read_config_word(struct pci_bus *bus, unsigned int devfn, int where, u16 *val);
int pci_bus_read_config_dword(struct pci_bus *bus, unsigned int devfn, int where, u32 *val);
int pci_bus_write_config_byte(struct pci_bus *bus, unsigned int devfn, int where, u8 val);
int pci_bus_write_config_word(struct pci_bus *bus, unsigned int devfn, int where, u16 val);
int pci_bus_write_config_dword(struct pci_bus *bus, unsigned int devfn, int where, u32 val);
int pci_read_config_byte(const struct pci_dev *dev, int where, u8 *val);
int pci_read_config_word(const struct pci_dev *dev, int where, u16 *val);
int pci_read_config_dword(const struct pci_dev *dev, int where, u32 *val);
int pci_write_config_byte(const struct pci_dev *dev, int where, u8 val);
int pci_write_config_word(const struct pci_dev *dev, int where, u16 val);
int pci_write_config_dword(const struct pci_dev *dev, int where, u32 val);

#endif
