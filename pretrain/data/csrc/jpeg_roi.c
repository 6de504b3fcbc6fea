/* Region-of-interest JPEG decoding with libjpeg-turbo (>= 1.5): decode only the rows and columns of a
 * crop, at a 1/denom DCT scale. Rows below the region are never entropy-decoded, rows above it are
 * entropy-decoded only (jpeg_skip_scanlines), columns outside it skip IDCT and colour conversion
 * (jpeg_crop_scanline). The pixels equal those of a full decode at the same scale.
 *
 * Loaded with ctypes by pretrain/data/jpeg.py, which compiles it on first use. */
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <jpeglib.h>

#define ERR_LEN 200
#define MARGIN 16 /* output pixels of context on each side of the region (1 would do for the upsampling) */

struct err_mgr {
  struct jpeg_error_mgr pub;
  jmp_buf jump;
  int warnings;
  char msg[JMSG_LENGTH_MAX];
};

static void on_error(j_common_ptr c) {
  struct err_mgr *e = (struct err_mgr *)c->err;
  (*c->err->format_message)(c, e->msg);
  longjmp(e->jump, 1);
}

/* level -1: a warning (corrupt or truncated data). Counted, so that the caller can hand the sample to a
 * decoder with its own policy instead of training on grey fill. */
static void on_message(j_common_ptr c, int level) {
  struct err_mgr *e = (struct err_mgr *)c->err;
  if (level < 0 && !e->warnings++) (*c->err->format_message)(c, e->msg);
}

/* Returns 0 on success, 1 if libjpeg warned (corrupt data; out may hold grey fill), -1 on an error, -2 if
 * the region is outside the scaled image. err receives the message. */
int roi_decode(const unsigned char *data, unsigned long n, int denom, int x, int y, int w, int h,
               unsigned char *out, char *err) {
  struct jpeg_decompress_struct cinfo;
  struct err_mgr jerr;
  JSAMPROW volatile row = NULL;
  cinfo.err = jpeg_std_error(&jerr.pub);
  jerr.pub.error_exit = on_error;
  jerr.pub.emit_message = on_message;
  jerr.warnings = 0;
  jerr.msg[0] = 0;
  if (setjmp(jerr.jump)) {
    snprintf(err, ERR_LEN, "%s", jerr.msg);
    jpeg_destroy_decompress(&cinfo);
    free(row);
    return -1;
  }
  jpeg_create_decompress(&cinfo);
  jpeg_mem_src(&cinfo, data, n);
  jpeg_read_header(&cinfo, TRUE);
  cinfo.out_color_space = JCS_RGB;
  cinfo.scale_num = 1;
  cinfo.scale_denom = denom;
  jpeg_start_decompress(&cinfo);
  if (x < 0 || y < 0 || w <= 0 || h <= 0 || x + w > (int)cinfo.output_width || y + h > (int)cinfo.output_height) {
    snprintf(err, ERR_LEN, "region %dx%d+%d+%d is outside the %ux%u image at scale 1/%d", w, h, x, y,
             cinfo.output_width, cinfo.output_height, denom);
    jpeg_destroy_decompress(&cinfo);
    return -2;
  }
  /* Fancy (smooth) chroma upsampling treats the edges of a cropped scanline as image edges: crop with a
   * margin, so that the columns handed back see their real neighbours. */
  int x0 = x > MARGIN ? x - MARGIN : 0, x1 = x + w + MARGIN;
  if (x1 > (int)cinfo.output_width) x1 = cinfo.output_width;
  JDIMENSION xoff = x0, width = x1 - x0;
  if (width < cinfo.output_width) jpeg_crop_scanline(&cinfo, &xoff, &width); /* xoff: down to an iMCU edge */
  if (y > 0) jpeg_skip_scanlines(&cinfo, y);
  row = (JSAMPROW)malloc((size_t)width * 3);
  if (!row) {
    snprintf(err, ERR_LEN, "out of memory");
    jpeg_destroy_decompress(&cinfo);
    return -1;
  }
  size_t dx = (size_t)(x - (int)xoff) * 3, line = (size_t)w * 3;
  for (int r = 0; r < h; r++) {
    JSAMPROW rp = row;
    jpeg_read_scanlines(&cinfo, &rp, 1);
    memcpy(out + (size_t)r * line, row + dx, line);
  }
  free(row);
  row = NULL;
  jpeg_abort_decompress(&cinfo); /* the rows below the region are never read */
  jpeg_destroy_decompress(&cinfo);
  if (jerr.warnings) {
    snprintf(err, ERR_LEN, "%s", jerr.msg);
    return 1;
  }
  return 0;
}
