/* mc146818_get_time(), after Linux 6.1's drivers/rtc/rtc-mc146818-lib.c: take
 * the seconds, wait out an update in progress (polling every millisecond),
 * check the seconds again, read the rest, then retry if an update started or
 * the seconds moved meanwhile; BCD and century decoded last. */
#include "io.h"
#include "rtc.h"

#define CMOS_READ(addr) rtc_cmos_read(addr)

/* mdelay(1): a millisecond of POST-port writes (about 1 us each on a PC). */
static void mdelay_1(void)
{
	for (int i = 0; i < 1000; i++)
		io_delay();
}

unsigned int mc146818_get_time(struct rtc_time *time)
{
	unsigned char ctrl, century;
	unsigned int retry;

again:
	/* Ensure that the RTC is accessible: bit 6 of register D must be 0. */
	if (CMOS_READ(RTC_VALID) & 0x40) {
		memset(time, 0xff, sizeof(*time));
		return 1;
	}

	time->tm_sec = CMOS_READ(RTC_SECONDS);
	if (CMOS_READ(RTC_FREQ_SELECT) & RTC_UIP) {
		mdelay_1();
		goto again;
	}
	/* Revalidate the above readout. */
	if (time->tm_sec != CMOS_READ(RTC_SECONDS))
		goto again;

	time->tm_min = CMOS_READ(RTC_MINUTES);
	time->tm_hour = CMOS_READ(RTC_HOURS);
	time->tm_mday = CMOS_READ(RTC_DAY_OF_MONTH);
	time->tm_mon = CMOS_READ(RTC_MONTH);
	time->tm_year = CMOS_READ(RTC_YEAR);
	century = CMOS_READ(RTC_CENTURY);
	ctrl = CMOS_READ(RTC_CONTROL);

	/* An update that started meanwhile, or seconds that moved: read again. */
	retry = CMOS_READ(RTC_FREQ_SELECT) & RTC_UIP;
	retry |= time->tm_sec != CMOS_READ(RTC_SECONDS);
	if (retry)
		goto again;

	if (!(ctrl & RTC_DM_BINARY)) {
		time->tm_sec = bcd2bin(time->tm_sec);
		time->tm_min = bcd2bin(time->tm_min);
		time->tm_hour = bcd2bin(time->tm_hour);
		time->tm_mday = bcd2bin(time->tm_mday);
		time->tm_mon = bcd2bin(time->tm_mon);
		time->tm_year = bcd2bin(time->tm_year);
		century = bcd2bin(century);
	}
	if (century > 20)
		time->tm_year += (century - 19) * 100;
	/* struct rtc_time counts years from 1900 and months from 0. */
	if (time->tm_year <= 69)
		time->tm_year += 100;
	time->tm_mon--;
	return 0;
}
