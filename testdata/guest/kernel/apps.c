/* Table of the embedded user programs (apps.S). */
#include "kernel.h"

#define APP(n) extern const u8 app_##n##_start[], app_##n##_end[];
APP(hello)
APP(counter)
APP(secret)
APP(systest)
APP(compute)
APP(crash)
APP(hcall)
APP(pp)
APP(cloaksecret)
APP(cloakcompute)
APP(cloakprobe)
APP(cloakvictim)
APP(chat)
APP(cloakdisk)
#undef APP

#define APP(n) {#n, app_##n##_start, app_##n##_end},
static const struct app apps[] = {
	APP(hello) APP(counter) APP(secret) APP(systest) APP(compute) APP(crash) APP(hcall) APP(pp)
	APP(cloaksecret) APP(cloakcompute) APP(cloakprobe) APP(cloakvictim) APP(chat) APP(cloakdisk)
};

const struct app *app_find(const char *name)
{
	for (size_t i = 0; i < sizeof apps / sizeof apps[0]; i++)
		if (!strcmp(apps[i].name, name))
			return &apps[i];
	return NULL;
}
