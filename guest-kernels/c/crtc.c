/* crtc: the CMOS RTC as Linux's boot reads it: rtc-cmos's look at registers B
 * and D, then the wall clock through x86_platform.get_wallclock ->
 * mach_get_cmos_time() -> mc146818_get_time() -> rtc_cmos_read() per register,
 * 64 times so that its exits are CMOS accesses. Prints the date only: the time
 * of day moves between runs. */
#include "rtc.h"

#define READS 64

int guest_main(void)
{
	unsigned char b = rtc_cmos_read(RTC_CONTROL), d = rtc_cmos_read(RTC_VALID);
	struct timespec64 ts, first = { 0, 0 };
	struct rtc_time tm;
	unsigned int backwards = 0;

	printk("rtc_cmos: register b 0x%02x (%s, %s), battery %s\n", b,
	       b & RTC_DM_BINARY ? "binary" : "bcd", b & RTC_24H ? "24h" : "12h",
	       d & RTC_VRT ? "good" : "dead");

	x86_init_wallclock();
	for (int i = 0; i < READS; i++) {
		x86_platform.get_wallclock(&ts);
		if (i == 0)
			first = ts;
		else if (ts.tv_sec < first.tv_sec)
			backwards++;
	}
	if (!first.tv_sec) {
		printk("crtc: the RTC is not accessible\n");
		return EXIT_FAILED;
	}
	rtc_time64_to_tm(first.tv_sec, &tm);
	printk("crtc: %u reads, date %04d-%02d-%02d weekday %d, day %lld of the epoch\n", READS,
	       tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_wday,
	       (long long)(first.tv_sec / 86400));
	printk("crtc: went backwards %u times\n", backwards);
	if (backwards)
		return EXIT_FAILED;
	printk("crtc: ok\n");
	return EXIT_OK;
}
