/* The MC146818 RTC, after Linux's include/linux/mc146818rtc.h, rtc.h and
 * arch/x86's x86_platform wall-clock hook. */
#ifndef AVEX_RTC_H
#define AVEX_RTC_H

#include "kernel.h"

#define RTC_SECONDS 0
#define RTC_MINUTES 2
#define RTC_HOURS 4
#define RTC_DAY_OF_WEEK 6
#define RTC_DAY_OF_MONTH 7
#define RTC_MONTH 8
#define RTC_YEAR 9
#define RTC_FREQ_SELECT 10
#define RTC_UIP 0x80
#define RTC_CONTROL 11
#define RTC_DM_BINARY 0x04
#define RTC_24H 0x02
#define RTC_INTR_FLAGS 12
#define RTC_VALID 13
#define RTC_VRT 0x80
/* The century byte the ACPI FADT names on PCs. */
#define RTC_CENTURY 0x32

struct rtc_time {
	int tm_sec;
	int tm_min;
	int tm_hour;
	int tm_mday;
	int tm_mon;
	int tm_year;
	int tm_wday;
	int tm_yday;
};

struct timespec64 {
	s64 tv_sec;
	long tv_nsec;
};

/* arch/x86: the platform's wall-clock reader, set at boot. */
struct x86_platform_ops {
	void (*get_wallclock)(struct timespec64 *ts);
};
extern struct x86_platform_ops x86_platform;

/* drivers/rtc_cmos.c */
unsigned char rtc_cmos_read(unsigned char addr);
void rtc_cmos_write(unsigned char val, unsigned char addr);
void mach_get_cmos_time(struct timespec64 *now);
void x86_init_wallclock(void);
s64 rtc_tm_to_time64(const struct rtc_time *tm);
void rtc_time64_to_tm(s64 time, struct rtc_time *tm);

/* drivers/mc146818.c */
unsigned int mc146818_get_time(struct rtc_time *time);

static inline unsigned int bcd2bin(unsigned char val)
{
	return (val & 0x0f) + (val >> 4) * 10;
}

#endif
