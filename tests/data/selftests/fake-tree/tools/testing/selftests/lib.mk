# The part of the kernel's selftests lib.mk that nestvirt relies on: TEST_GEN_PROGS under
# $(OUTPUT), one program per source, built with the caller's LDFLAGS.
TEST_GEN_PROGS := $(patsubst %,$(OUTPUT)/%,$(TEST_GEN_PROGS))

all: $(TEST_GEN_PROGS)

$(OUTPUT)/%: %.c
	@mkdir -p $(dir $@)
	$(CC) -O1 -Wall $< $(LDFLAGS) -o $@
