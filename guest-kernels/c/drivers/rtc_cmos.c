/* CMOS access and the wall clock, after Linux's arch/x86/kernel/rtc.c (index to
 * 0x70, data at 0x71, one function call per register) and the date arithmetic
 * of drivers/rtc/lib.c. x86_platform.get_wallclock is set at init, so callers
 * reach mach_get_cmos_time() through a function pointer, as in Linux. */
#include "io.h"
#include "rtc.h"

#define RTC_PORT(x) (0x70 + (x))

struct x86_platform_ops x86_platform;

unsigned char rtc_cmos_read(unsigned char addr)
{
	outb(addr, RTC_PORT(0));
	return inb(RTC_PORT(1));
}

void rtc_cmos_write(unsigned char val, unsigned char addr)
{
	outb(addr, RTC_PORT(0));
	outb(val, RTC_PORT(1));
}

/* Days from 1970-01-01 (Gauss's algorithm, as mktime64). */
s64 rtc_tm_to_time64(const struct rtc_time *tm)
{
	unsigned int mon = tm->tm_mon + 1, year = tm->tm_year + 1900;

	if (0 >= (int)(mon -= 2)) {
		mon += 12;
		year -= 1;
	}
	return ((((s64)(year / 4 - year / 100 + year / 400 + 367 * mon / 12 + tm->tm_mday) +
		  year * 365 - 719499) * 24 + tm->tm_hour) * 60 + tm->tm_min) * 60 + tm->tm_sec;
}

static const unsigned char rtc_days_in_month[] = { 31, 28, 31, 30, 31, 30,
						   31, 31, 30, 31, 30, 31 };

static int is_leap_year(unsigned int year)
{
	return (!(year % 4) && (year % 100)) || !(year % 400);
}

void rtc_time64_to_tm(s64 time, struct rtc_time *tm)
{
	s64 days = time / 86400;
	int secs = (int)(time % 86400);
	int year = 1970;

	tm->tm_wday = (int)((days + 4) % 7);
	while (days >= 365 + is_leap_year(year)) {
		days -= 365 + is_leap_year(year);
		year++;
	}
	tm->tm_year = year - 1900;
	tm->tm_yday = (int)days;
	for (tm->tm_mon = 0; tm->tm_mon < 11; tm->tm_mon++) {
		int n = rtc_days_in_month[tm->tm_mon] + (tm->tm_mon == 1 && is_leap_year(year));

		if (days < n)
			break;
		days -= n;
	}
	tm->tm_mday = (int)days + 1;
	tm->tm_hour = secs / 3600;
	tm->tm_min = secs / 60 % 60;
	tm->tm_sec = secs % 60;
}

void mach_get_cmos_time(struct timespec64 *now)
{
	struct rtc_time tm;

	if (mc146818_get_time(&tm)) {
		now->tv_sec = 0;
		now->tv_nsec = 0;
		return;
	}
	now->tv_sec = rtc_tm_to_time64(&tm);
	now->tv_nsec = 0;
}

void x86_init_wallclock(void)
{
	x86_platform.get_wallclock = mach_get_cmos_time;
}
