#include "k.c"
#include <stdio.h>
#include <time.h>
static double now(void){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+1e-9*t.tv_nsec;}
int main(int argc,char**argv){
  int64_t E=atoi(argv[1]), F=atoi(argv[2]), m=atoi(argv[3]), D=512; int nth=atoi(argv[4]); int which=atoi(argv[5]);
  int64_t S=E*m, W=2*F;
  float *x=malloc(S*D*4),*w=malloc(E*W*D*4),*h=malloc(S*W*4),*a=malloc(S*F*4),*wo=malloc(E*D*F*4),*out=calloc(S*D,4),*ws=malloc(S*4);
  for(int64_t i=0;i<S*D;i++)x[i]=(i%13)*0.01f; for(int64_t i=0;i<E*W*D;i++)w[i]=(i%7)*0.01f; for(int64_t i=0;i<E*D*F;i++)wo[i]=(i%7)*0.01f;
  for(int64_t i=0;i<S*F;i++)a[i]=(i%5)*0.1f; for(int64_t i=0;i<S;i++)ws[i]=0.5f;
  int64_t *tok=malloc(S*8),*st=malloc(E*8),*en=malloc(E*8);
  for(int64_t i=0;i<S;i++)tok[i]=(i*7919)%S; for(int64_t e=0;e<E;e++){st[e]=e*m;en[e]=(e+1)*m;}
  const char *names[]={"full","nopack","noepi","nopf"};
  for(int rep=0;rep<3;rep++) for(int v=0;v<4;v++){
    getenv_nopack=v==1; getenv_noepi=v==2; getenv_nopf=v==3;
    double best=1e9;
    for(int r=0;r<5;r++){double t0=now();
      if(which==0) packed_up(x,D,tok,st,en,E,w,NULL,W,D,0,1,h,a,nth);
      else packed_down(a,F,tok,ws,st,en,E,wo,NULL,D,F,0,out,D,nth);
      double t=now()-t0; if(t<best)best=t;}
    double fl=which==0?2.0*S*D*W:2.0*S*D*F;
    printf("%s %.1f GF/s  ",names[v],fl/best/1e9);
    if(v==3)printf("\n");
  }
}
